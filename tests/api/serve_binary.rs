//! `chatbridge serve` as a child process, as an operator runs it: one
//! process per database (a second is refused; a killed one leaves no lock
//! behind), and what its log says: refused webhooks at WARN without a
//! flood, no colour codes in a file, JSON fields an on-call engineer can
//! filter on. Plus the reload's restart-needed warnings (in process).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatbridge::clock::SystemClock;
use chatbridge::market::fake::{FakeConfig, FakeMarket, ScriptedAnswer};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::process::*;

pub(crate) fn fake() -> FakeMarket {
    FakeMarket::start(
        "127.0.0.1:0",
        FakeConfig {
            api_keys: vec![API_KEY.into()],
            ..FakeConfig::default()
        },
        Arc::new(SystemClock),
    )
    .unwrap()
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// JSON log lines whose message is `message`.
fn json_lines(log: &str, message: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

#[actix_rt::test]
async fn a_second_serve_on_one_database_is_refused_and_a_killed_one_leaves_no_lock() {
    let market = fake();
    let root = ServeRoot::new(&market);
    let mut first = root.start(&[]).await;

    let mut second = root.spawn(&[]);
    let status = second
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the second serve exits on its own");

    assert!(!status.success(), "the second serve must not start");
    let said = second.log_text();
    assert!(
        said.contains(&root.db().display().to_string()) && said.contains("another chatbridge"),
        "the error names the file and that another chatbridge serves it: {said}"
    );
    let (code, _) = {
        let mut r = first
            .client
            .get(format!("{}/readyz", first.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.body().await)
    };
    assert_eq!(code, 200, "the first one serves on");

    first.kill();
    let _third = root.start(&[]).await;
    market.stop().await;
}

#[actix_rt::test]
async fn refused_webhooks_are_logged_at_warn_without_colour_and_a_flood_is_not() {
    let market = fake();
    let root = ServeRoot::new(&market);
    let serve = root.start(&[]).await;
    let body = br#"{"id":"evt-x","type":"order.shipped"}"#;
    let mut bad = signed_headers(body, now_secs());
    bad.retain(|(k, _)| *k != "webhook-signature");
    bad.push(("webhook-signature", "v1,bm9wZQ==".into()));

    let started = Instant::now();
    assert_eq!(serve.post("/hooks/oms", &bad, body).await, 401);
    let line = serve
        .wait_for_line(&["WARN", "webhook refused", "unauthorized"])
        .await;
    for _ in 0..30 {
        assert_eq!(serve.post("/hooks/oms", &bad, body).await, 401);
    }
    assert_eq!(serve.post("/hooks/nope", &bad, body).await, 404);
    serve
        .wait_for_line(&["webhook refused", "unknown_source"])
        .await;
    let elapsed = started.elapsed().as_secs();

    for part in [
        "source=\"oms\"",
        "status=401",
        "reason=",
        "peer=\"127.0.0.1:",
    ] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
    let log = serve.log_text();
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    let unauthorized = log
        .lines()
        .filter(|l| l.contains("webhook refused") && l.contains("unauthorized"))
        .count();
    // One line per source and code per 10 s, however fast they come.
    assert!(
        unauthorized <= 2 + elapsed as usize / 10,
        "31 refusals in {elapsed} s made {unauthorized} lines:\n{log}"
    );
    market.stop().await;
}

#[actix_rt::test]
async fn json_logs_carry_numeric_ids_the_next_attempt_and_no_empty_fields() {
    let market = fake();
    market.script(ScriptedAnswer {
        status: 503,
        errors: vec![],
        business_id: None,
        chat_id: Some(5001),
        times: 1,
        ..Default::default()
    });
    let root = ServeRoot::new(&market);
    root.write("templates/order_delivered.hbs", "{{no.such.field}}");
    let serve = root
        .start(&[
            ("CHATBRIDGE__LOG__FORMAT", "json"),
            ("RUST_LOG", "info,chatbridge::ingest=debug"),
        ])
        .await;
    async fn post(serve: &ServeProcess, event: Value) -> u16 {
        let text = event.to_string();
        let headers = signed_headers(text.as_bytes(), now_secs());
        serve.post("/hooks/oms", &headers, text.as_bytes()).await
    }

    assert_eq!(post(&serve, sample("order_shipped")).await, 202);
    assert_eq!(
        post(&serve, sample_as("order_shipped", "evt-ok", Some(5002))).await,
        202
    );
    assert_eq!(post(&serve, sample("order_delivered")).await, 202);
    serve
        .wait_for_line(&["Market call failed; will retry"])
        .await;
    serve.wait_for_line(&["\"delivered\""]).await;
    serve.wait_for_line(&["webhook accepted"]).await;
    let log = serve.log_text();

    let retry = &json_lines(&log, "Market call failed; will retry")[0]["fields"];
    assert!(
        retry["business"].is_i64() && retry["chat"].is_i64(),
        "{retry}"
    );
    assert!(retry["delivery"].is_i64(), "{retry}");
    let next = retry["next_attempt_at"].as_str().expect("next_attempt_at");
    assert!(
        chrono::DateTime::parse_from_rfc3339(next).is_ok(),
        "{retry}"
    );
    assert!(retry.get("codes").is_none(), "no empty codes: {retry}");

    let delivered = &json_lines(&log, "delivered")[0]["fields"];
    assert_eq!(delivered["business"], json!(111), "{delivered}");
    assert!(delivered["chat"].is_i64(), "{delivered}");
    for empty in ["codes", "reason", "next_attempt_at"] {
        assert!(delivered.get(empty).is_none(), "no {empty}: {delivered}");
    }

    let failed = &json_lines(
        &log,
        "delivery failed to render; fix the template and retry it",
    )[0]["fields"];
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no.such.field") || r.contains("order_delivered")),
        "the render failure says why: {failed}"
    );
    assert!(!json_lines(&log, "webhook accepted").is_empty());
    market.stop().await;
}

/// `(status, needs_restart)` of `POST /admin/reload`.
async fn reload(app: &TestApp) -> Vec<String> {
    let (status, body) = app.admin_post("/admin/reload", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    body["needs_restart"]
        .as_array()
        .map(|a| a.iter().map(|k| k.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn set_setting(root: &Path, from: &str, to: &str) {
    let path = root.join("config/chatbridge.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from} not in the shipped settings");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

#[actix_rt::test]
async fn a_reload_names_each_startup_setting_that_really_differs_from_the_one_in_effect() {
    let app = spawn_app().await;
    let shipped = std::fs::read_to_string(repo().join("config/chatbridge.toml")).unwrap();
    let keep_alive = shipped
        .lines()
        .find(|l| l.starts_with("keep_alive_secs"))
        .expect("keep_alive_secs in the shipped settings")
        .split('#')
        .next()
        .unwrap()
        .trim()
        .to_owned();

    set_setting(app.root.path(), &keep_alive, "keep_alive_secs = 77");
    let changed = reload(&app).await;
    // Another change (a template) while keep_alive still waits: named again.
    std::fs::write(app.root.path().join("templates/extra.hbs"), "x").unwrap();
    let still = reload(&app).await;
    set_setting(app.root.path(), "keep_alive_secs = 77", &keep_alive);
    let back = reload(&app).await;

    assert_eq!(changed, ["server.keep_alive_secs"], "one key per warning");
    assert_eq!(still, ["server.keep_alive_secs"]);
    assert_eq!(
        back,
        Vec::<String>::new(),
        "back to the value in effect: nothing to restart for"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_reload_says_the_storage_pool_settings_wait_for_a_restart() {
    let app = spawn_app().await;
    // The store's pool (and its listener) are built once, at start.
    set_setting(
        app.root.path(),
        "retention_days = 30",
        "retention_days = 30\nconnect_timeout_secs = 9",
    );
    let changed = reload(&app).await;
    assert_eq!(changed, ["storage.connect_timeout_secs"]);
    app.stop().await;
}
