//! Running the service: `/metrics` (parsed as Prometheus text), `/healthz`
//! and `/readyz`, hot reload through the admin API (applied, refused for a
//! template that does not compile or that would break a recent event, not
//! blocked by an event that already fails), and the `chatbridge deliveries`
//! command line against a running instance.

use std::process::{Command, Output};
use std::time::Duration;

use chatbridge::clock::ManualClock;
use chatbridge::market::fake::ScriptedAnswer;
use chatbridge::store::ApiErrorEntry;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::prometheus::*;

const START: i64 = 1_795_000_000_000;

/// The shipped order_shipped text for the shipped sample.
const SHIPPED_TEXT: &str = "Здравствуйте! Ваш заказ №51234567 отправлен: 3 товара уже в пути.\n\
     Служба доставки: СДЭК, трек-номер для отслеживания: RU123456789.\n\
     С уважением, команда Дом & Сад \"Уют\"";

// ---------------------------------------------------------------- helpers

fn scripted(status: u16, code: &str, message: &str, chat: Option<i64>) -> ScriptedAnswer {
    ScriptedAnswer {
        status,
        errors: vec![ApiErrorEntry {
            code: code.into(),
            message: Some(message.into()),
        }],
        business_id: None,
        chat_id: chat,
        times: 1,
        ..Default::default()
    }
}

async fn post_one(app: &TestApp, event: &Value) -> i64 {
    let (status, body) = app.post_event("oms", event).await;
    assert_eq!(status, 202, "{body}");
    body["deliveries"][0]["id"].as_i64().unwrap()
}

async fn readyz(app: &TestApp) -> Value {
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    body
}

fn write(app: &TestApp, path: &str, contents: &str) {
    std::fs::write(app.root.path().join(path), contents).unwrap();
}

async fn reload(app: &TestApp) -> (u16, Value) {
    app.admin_post("/admin/reload", &json!({})).await
}

fn problems(body: &Value) -> Vec<String> {
    body["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems listed: {body}"))
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

/// Waits for the delivery and returns the text the Market received for it.
async fn delivered_text(app: &TestApp, id: i64) -> String {
    let done = app.wait_for_state(id, "delivered").await;
    let text = done["delivery"]["text"].as_str().unwrap().to_owned();
    assert!(
        app.market.delivered().iter().any(|r| r.message == text),
        "the Market got {text:?}"
    );
    text
}

// ---------------------------------------------------------------- metrics

#[actix_rt::test]
async fn market_request_latency_and_delivery_metrics_follow_the_sends() {
    let app = spawn_app().await;
    for n in 0..2 {
        let id = post_one(
            &app,
            &sample_as("order_shipped", &format!("m-{n}"), Some(5400 + n)),
        )
        .await;
        app.wait_for_state(id, "delivered").await;
    }
    app.market
        .script(scripted(400, "CHAT_NOT_FOUND", "Чат не найден", Some(5499)));
    let dead = post_one(&app, &sample_as("order_shipped", "m-dead", Some(5499))).await;
    app.wait_for_state(dead, "dead").await;

    let samples = scrape(&app).await;

    let requests = "chatbridge_market_requests_total";
    assert_eq!(
        metric(&samples, requests, &[("status", "200"), ("code", "")]),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &samples,
            requests,
            &[("status", "400"), ("code", "CHAT_NOT_FOUND")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &samples,
            "chatbridge_send_latency_seconds_count",
            &[("business", "111")]
        ),
        Some(3.0)
    );
    assert!(metric(
        &samples,
        "chatbridge_send_latency_seconds_sum",
        &[("business", "111")]
    )
    .is_some_and(|s| s >= 0.0));
    assert_eq!(
        metric(
            &samples,
            "chatbridge_send_latency_seconds_bucket",
            &[("business", "111"), ("le", "+Inf")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &samples,
            "chatbridge_deliveries_total",
            &[("state", "delivered")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &samples,
            "chatbridge_deliveries_total",
            &[("state", "dead")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&samples, "chatbridge_deliveries", &[("state", "dead")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&samples, "chatbridge_deliveries", &[("state", "queued")]),
        Some(0.0)
    );
    assert_eq!(
        metric(&samples, "chatbridge_deliveries", &[("state", "sending")]),
        Some(0.0)
    );
    // Three sends counted against business 111's quota (the 400 counts too).
    wait_metric(&app, "chatbridge_quota_used", &[("business", "111")], 3.0).await;
    wait_metric(
        &app,
        "chatbridge_quota_limit",
        &[("business", "111")],
        1000.0,
    )
    .await;
    app.stop().await;
}

#[actix_rt::test]
async fn queue_depth_oldest_age_and_quota_gauges_describe_the_backlog() {
    let clock = ManualClock::new(START);
    let app = spawn_app_with(TestOptions {
        clock: Some(clock.clone()),
        tweak: Some(Box::new(|s| s.market.hourly_limit = 2)),
        ..TestOptions::default()
    })
    .await;
    for n in 0..2 {
        let id = post_one(
            &app,
            &sample_as("order_shipped", &format!("g-{n}"), Some(5500 + n)),
        )
        .await;
        app.wait_for_state(id, "delivered").await;
    }
    let mut waiting = Vec::new();
    for n in 2..5 {
        waiting.push(
            post_one(
                &app,
                &sample_as("order_shipped", &format!("g-{n}"), Some(5500 + n)),
            )
            .await,
        );
    }
    // Business 222 has one too; it goes at once.
    let other = post_one(&app, &sample_as("return_approved", "g-222", None)).await;
    app.wait_for_state(other, "delivered").await;

    wait_metric(&app, "chatbridge_quota_used", &[("business", "111")], 2.0).await;
    wait_metric(&app, "chatbridge_quota_limit", &[("business", "111")], 2.0).await;
    wait_metric(&app, "chatbridge_quota_used", &[("business", "222")], 1.0).await;
    let samples = scrape(&app).await;
    assert_eq!(
        metric(&samples, "chatbridge_queue_depth", &[("business", "111")]),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &samples,
            "chatbridge_oldest_pending_age_seconds",
            &[("business", "111")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&samples, "chatbridge_deliveries", &[("state", "queued")]),
        Some(3.0)
    );
    assert_eq!(
        metric(&samples, "chatbridge_queue_depth", &[("business", "222")]),
        None,
        "a business with nothing open is not listed"
    );

    clock.advance(Duration::from_secs(120));
    let samples = scrape(&app).await;
    assert_eq!(
        metric(
            &samples,
            "chatbridge_oldest_pending_age_seconds",
            &[("business", "111")]
        ),
        Some(120.0)
    );
    assert_eq!(
        metric(&samples, "chatbridge_queue_depth", &[("business", "111")]),
        Some(3.0)
    );

    // The window passes: two more go, one waits.
    clock.advance(Duration::from_secs(3_500));
    app.wait_for_state(waiting[1], "delivered").await;
    let samples = scrape(&app).await;
    assert_eq!(
        metric(&samples, "chatbridge_queue_depth", &[("business", "111")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&samples, "chatbridge_deliveries", &[("state", "queued")]),
        Some(1.0)
    );
    wait_metric(&app, "chatbridge_quota_used", &[("business", "111")], 2.0).await;
    app.stop().await;
}

#[actix_rt::test]

async fn a_delivery_that_fails_to_render_counts_as_failed() {
    let app = spawn_app().await;
    let mut event = sample_as("order_shipped", "f-1", None);
    event["tracking"].as_object_mut().unwrap().remove("number");
    let (status, body) = app.post_event("oms", &event).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["deliveries"][0]["state"], "failed");

    let samples = scrape(&app).await;
    assert_eq!(
        metric(&samples, "chatbridge_deliveries", &[("state", "failed")]),
        Some(1.0)
    );
    app.stop().await;
}

#[actix_rt::test]

async fn webhooks_are_counted_by_source_and_outcome() {
    let app = spawn_app().await;
    for n in 0..3 {
        post_one(&app, &sample_as("order_delivered", &format!("w-{n}"), None)).await;
    }
    let body = sample_as("order_delivered", "w-bad", None)
        .to_string()
        .into_bytes();
    let mut headers = signed_headers(&body, app.clock.now_ms() / 1000);
    headers.retain(|(k, _)| *k != "webhook-signature");
    headers.push((
        "webhook-signature",
        "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
    ));
    let (status, answer) = app.post_raw("/hooks/oms", &headers, body).await;
    assert_eq!(status, 401, "{answer}");

    let samples = scrape(&app).await;
    let webhooks = "chatbridge_webhooks_total";
    assert_eq!(
        metric(
            &samples,
            webhooks,
            &[("source", "oms"), ("outcome", "accepted")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &samples,
            webhooks,
            &[("source", "oms"), ("outcome", "unauthorized")]
        ),
        Some(1.0)
    );
    app.stop().await;
}

#[actix_rt::test]
async fn config_reloads_are_counted_by_outcome() {
    let app = spawn_app().await;
    let samples = scrape(&app).await;
    assert_eq!(
        metric(
            &samples,
            "chatbridge_config_reloads_total",
            &[("outcome", "applied")]
        ),
        None,
        "nothing reloaded yet"
    );

    assert_eq!(reload(&app).await.0, 200);
    write(
        &app,
        "templates/order_shipped.hbs",
        "Заказ №{{orderId}} отправлен.",
    );
    assert_eq!(reload(&app).await.0, 200);
    write(
        &app,
        "templates/order_shipped.hbs",
        "{{#if orderId}}не закрыт",
    );
    assert_eq!(reload(&app).await.0, 422);

    let samples = scrape(&app).await;
    let reloads = "chatbridge_config_reloads_total";
    assert_eq!(
        metric(&samples, reloads, &[("outcome", "applied")]),
        Some(2.0)
    );
    assert_eq!(
        metric(&samples, reloads, &[("outcome", "refused")]),
        Some(1.0)
    );
    app.stop().await;
}

// ---------------------------------------------------------------- health and readiness

#[actix_rt::test]
async fn healthz_and_readyz_answer_and_readyz_shows_a_refused_reload() {
    let app = spawn_app().await;
    let (status, health) = app.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(health, json!({"status": "ok"}));

    let ready = readyz(&app).await;
    assert_eq!(ready["status"], "ready");
    let version = ready["config_version"].as_str().unwrap().to_owned();
    assert!(!version.is_empty());
    assert!(ready["reload"]["last_error"].is_null(), "{ready}");

    write(
        &app,
        "templates/order_shipped.hbs",
        "{{#if orderId}}не закрыт",
    );
    let (status, refused) = reload(&app).await;
    assert_eq!(status, 422, "{refused}");

    let ready = readyz(&app).await;
    assert_eq!(
        ready["status"], "ready",
        "a refused reload keeps the service ready"
    );
    assert_eq!(ready["config_version"], version.as_str(), "unchanged");
    let last_error = ready["reload"]["last_error"]
        .as_array()
        .unwrap_or_else(|| panic!("reload.last_error: {ready}"));
    assert!(
        last_error.iter().any(|p| {
            let p = p.as_str().unwrap();
            // `<dir>/templates/order_shipped.hbs: line 1, column 25: invalid handlebars syntax: ...`
            p.contains("templates/order_shipped.hbs: line 1, column")
                && p.contains("handlebars syntax")
        }),
        "the file, the place and the reason: {last_error:?}"
    );
    assert!(ready["reload"]["last_attempt_at"].is_string());

    // Fixed: applied, the error is gone and the version moves on.
    write(
        &app,
        "templates/order_shipped.hbs",
        "Заказ №{{orderId}} отправлен.",
    );
    let (status, applied) = reload(&app).await;
    assert_eq!(status, 200, "{applied}");
    let ready = readyz(&app).await;
    assert!(ready["reload"]["last_error"].is_null(), "{ready}");
    assert_eq!(ready["config_version"], applied["config_version"]);
    assert_ne!(ready["config_version"], version.as_str());
    app.stop().await;
}

// ---------------------------------------------------------------- reload

#[actix_rt::test]
async fn a_reload_applies_a_changed_template_to_new_events() {
    let app = spawn_app().await;
    let before = post_one(&app, &sample_as("order_shipped", "r-1", None)).await;
    assert_eq!(delivered_text(&app, before).await, SHIPPED_TEXT);
    let version = readyz(&app).await["config_version"]
        .as_str()
        .unwrap()
        .to_owned();

    // Nothing changed on disk: nothing to swap.
    let (status, same) = reload(&app).await;
    assert_eq!(status, 200, "{same}");
    assert_eq!(same, json!({"config_version": version, "changed": false}));

    write(
        &app,
        "templates/order_shipped.hbs",
        "Заказ №{{orderId}} в пути, трек {{tracking.number}}.",
    );
    let (status, applied) = reload(&app).await;

    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["changed"], true);
    assert!(applied.get("needs_restart").is_none(), "{applied}");
    let new_version = applied["config_version"].as_str().unwrap();
    assert_ne!(new_version, version);
    assert_eq!(readyz(&app).await["config_version"], new_version);
    let after = post_one(&app, &sample_as("order_shipped", "r-2", None)).await;
    assert_eq!(
        delivered_text(&app, after).await,
        "Заказ №51234567 в пути, трек RU123456789."
    );
    assert_eq!(
        app.delivery(before).await["delivery"]["text"],
        SHIPPED_TEXT,
        "what was sent stays as sent"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_template_that_does_not_compile_is_refused_and_the_old_one_keeps_serving() {
    let app = spawn_app().await;
    let version = readyz(&app).await["config_version"].clone();
    write(
        &app,
        "templates/order_shipped.hbs",
        "{{#if tracking.number}}Трек: {{tracking.number}}",
    );

    let (status, refused) = reload(&app).await;

    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["code"], "config_refused", "{refused}");
    assert_eq!(refused["config_version"], version);
    let problems = problems(&refused);
    assert!(
        problems.iter().any(|p| p.contains("order_shipped.hbs")),
        "the file is named: {problems:?}"
    );
    let id = post_one(&app, &sample_as("order_shipped", "c-1", None)).await;
    assert_eq!(
        delivered_text(&app, id).await,
        SHIPPED_TEXT,
        "the old template"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_template_that_would_break_a_recent_event_is_refused_naming_the_event() {
    let app = spawn_app().await;
    let stored = post_one(&app, &sample_as("order_shipped", "b-1", None)).await;
    app.wait_for_state(stored, "delivered").await;
    let internal = app.delivery(stored).await["delivery"]["event_id"]
        .as_i64()
        .unwrap();
    let version = readyz(&app).await["config_version"].clone();
    write(
        &app,
        "templates/order_shipped.hbs",
        "Заказ №{{orderId}}, склад {{warehouse.name}}",
    );

    let (status, refused) = reload(&app).await;

    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["config_version"], version);
    let problems = problems(&refused);
    assert!(
        problems
            .iter()
            .any(|p| p.contains(&format!("event {internal} "))
                && p.contains("\"b-1\"")
                && p.contains("order-shipped")
                && p.contains("warehouse.name")),
        "the event, route and missing field are named: {problems:?}"
    );
    let ready = readyz(&app).await;
    assert_eq!(ready["config_version"], version);
    assert!(ready["reload"]["last_error"]
        .as_array()
        .is_some_and(|e| e.iter().any(|p| p.as_str().unwrap().contains("\"b-1\""))));
    let id = post_one(&app, &sample_as("order_shipped", "b-2", None)).await;
    assert_eq!(
        delivered_text(&app, id).await,
        SHIPPED_TEXT,
        "the old template"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn an_event_that_already_fails_does_not_block_a_change_or_its_fix() {
    let app = spawn_app().await;
    let good = post_one(&app, &sample_as("order_shipped", "x-good", None)).await;
    app.wait_for_state(good, "delivered").await;
    let mut broken = sample_as("order_shipped", "x-bad", Some(5601));
    broken["tracking"].as_object_mut().unwrap().remove("number");
    let bad = post_one(&app, &broken).await;
    assert_eq!(app.delivery(bad).await["delivery"]["state"], "failed");

    // A new text that still needs the field the bad event lacks: the bad
    // event fails today already, so it does not block the change.
    write(
        &app,
        "templates/order_shipped.hbs",
        "Заказ №{{orderId}}: трек {{tracking.number}}",
    );
    let (status, applied) = reload(&app).await;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["changed"], true);

    // The fix: the field is optional now. Applied, and the retry sends it.
    write(
        &app,
        "templates/order_shipped.hbs",
        "Заказ №{{orderId}} отправлен.",
    );
    let (status, applied) = reload(&app).await;
    assert_eq!(status, 200, "{applied}");
    let (status, retried) = app
        .admin_post(&format!("/admin/deliveries/{bad}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["text_changed"], true);
    assert_eq!(
        delivered_text(&app, bad).await,
        "Заказ №51234567 отправлен."
    );
    app.stop().await;
}

// ---------------------------------------------------------------- command line

/// Runs the `chatbridge` binary off the test's thread, so the app (on this
/// thread's actix system) keeps serving while the command talks to it.
pub async fn cli(args: Vec<String>) -> Output {
    let shown = args.join(" ");
    let output = actix_rt::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_chatbridge"))
            .args(&args)
            .env_remove("CHATBRIDGE_URL")
            .env_remove("CHATBRIDGE__ADMIN__TOKEN")
            .output()
    })
    .await
    .expect("the blocking task ran")
    .expect("the binary runs");
    eprintln!(
        "$ chatbridge {shown}\n-> {:?}\n{}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

/// `chatbridge deliveries --url .. --token .. <action...>`.
fn deliveries(app: &TestApp, action: &[&str]) -> Vec<String> {
    let mut all = args(&["deliveries", "--url", &app.base, "--token", ADMIN_TOKEN]);
    all.extend(args(action));
    all
}

#[actix_rt::test]
async fn the_cli_lists_shows_and_retries_deliveries_of_a_running_instance() {
    let app = spawn_app().await;
    let first = post_one(&app, &sample_as("order_shipped", "cli-1", Some(5701))).await;
    let second = post_one(&app, &sample_as("order_delivered", "cli-2", Some(5702))).await;
    let mut broken = sample_as("order_shipped", "cli-3", Some(5703));
    broken["tracking"].as_object_mut().unwrap().remove("number");
    let failed = post_one(&app, &broken).await;
    app.wait_for_state(first, "delivered").await;
    app.wait_for_state(second, "delivered").await;

    // list --state delivered: one line per delivery, with id and state.
    let out = cli(deliveries(&app, &["list", "--state", "delivered"])).await;
    assert!(out.status.success());
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    for (row, id, chat, route) in [
        (&rows[0], first, "5701", "order-shipped"),
        (&rows[1], second, "5702", "order-delivered"),
    ] {
        assert_eq!(
            row[..5],
            [id.to_string().as_str(), "delivered", "111", chat, route],
            "{text}"
        );
    }
    assert!(!text.contains(&format!(" {failed} ")), "{text}");
    let out = cli(deliveries(&app, &["list", "--state", "failed"])).await;
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with(&format!("{failed} "))
                && l.contains("failed")
                && l.contains("tracking.number")),
        "the failed one with its reason: {text}"
    );

    // show: the delivery, its attempts and its event, as JSON.
    let out = cli(deliveries(&app, &["show", &first.to_string()])).await;
    assert!(out.status.success());
    let shown: Value = serde_json::from_str(&stdout(&out)).expect("show prints JSON");
    assert_eq!(shown["delivery"]["id"], first);
    assert_eq!(shown["delivery"]["state"], "delivered");
    assert_eq!(shown["attempts"][0]["http_status"], 200);
    assert_eq!(shown["event"]["event_id"], "cli-1");

    // Fix the template, reload from the command line, retry the failed one.
    write(
        &app,
        "templates/order_shipped.hbs",
        "Заказ №{{orderId}} отправлен.",
    );
    let out = cli(args(&[
        "reload",
        "--url",
        &app.base,
        "--token",
        ADMIN_TOKEN,
    ]))
    .await;
    assert!(out.status.success());
    let reloaded: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(reloaded["changed"], true);
    let out = cli(deliveries(&app, &["retry", &failed.to_string()])).await;
    assert!(out.status.success());
    let retried: Value = serde_json::from_str(&stdout(&out)).expect("retry prints JSON");
    assert_eq!(retried["id"], failed);
    assert_eq!(retried["state"], "queued");
    assert_eq!(retried["text_changed"], true);
    assert_eq!(
        delivered_text(&app, failed).await,
        "Заказ №51234567 отправлен."
    );

    // Errors: a delivered delivery cannot be retried; a wrong token is refused.
    let out = cli(deliveries(&app, &["retry", &first.to_string()])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("409"));
    let out = cli(args(&[
        "deliveries",
        "--url",
        &app.base,
        "--token",
        "wrong",
        "list",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not accepted"));
    app.stop().await;
}

#[actix_rt::test]

async fn the_cli_takes_url_and_token_after_the_action_too() {
    let app = spawn_app().await;
    let id = post_one(&app, &sample_as("order_shipped", "cli-order", None)).await;
    app.wait_for_state(id, "delivered").await;

    let out = cli(args(&[
        "deliveries",
        "list",
        "--url",
        &app.base,
        "--token",
        ADMIN_TOKEN,
        "--state",
        "delivered",
    ]))
    .await;
    assert!(out.status.success(), "exit {:?}", out.status.code());
    assert!(stdout(&out).contains("delivered"));
    let out = cli(args(&[
        "deliveries",
        "show",
        &id.to_string(),
        "--url",
        &app.base,
        "--token",
        ADMIN_TOKEN,
    ]))
    .await;
    assert!(out.status.success());
    app.stop().await;
}
