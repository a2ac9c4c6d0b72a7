//! The admin API over real HTTP: listing with every filter and paging,
//! one delivery with its event and attempts, events by both ids, retry of
//! one or many (re-rendered with the templates in force), cancel, the queue
//! per business with its quota, the bearer token, and the OpenAPI document
//! that describes it all.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chatbridge::clock::{to_rfc3339, ManualClock};
use chatbridge::market::fake::{FakeConfig, ScriptedAnswer};
use chatbridge::store::ApiErrorEntry;
use serde_json::{json, Value};

use super::helpers::*;

const START: i64 = 1_795_000_000_000;

/// A second, unsigned source `crm`, a route for its `note.added` events
/// (business 333), and a route for `note.*` events of `oms` whose template
/// needs `note.text` (so an event without it fails to render).
fn admin_files() -> Vec<(String, String)> {
    vec![
        shipped_settings_plus(
            r#"
[sources.crm]
insecure = true
event_type = "/type"
event_id = "/id"
"#,
        ),
        shipped_routes_plus(
            r#"
[[routes]]
name = "crm-note"
source = "crm"
event = "note.added"
template = "custom_text"
business_id = 333
chat_id = "{{chatId}}"

[[routes]]
name = "note"
source = "oms"
event = "note.*"
template = "note"
business_id = "{{businessId}}"
chat_id = "{{chatId}}"

[[routes]]
name = "multi-a"
source = "oms"
event = "multi.event"
template = "custom_text"
business_id = "{{businessId}}"
chat_id = "{{chatId}}"
continue = true

[[routes]]
name = "multi-b"
source = "oms"
event = "multi.event"
template = "custom_text"
business_id = "{{businessId}}"
chat_id = 6002
"#,
        ),
        ("templates/custom_text.hbs".into(), "{{text}}".into()),
        (
            "templates/note.hbs".into(),
            "Заметка к заказу №{{orderId}}: {{note.text}}".into(),
        ),
    ]
}

fn admin_options() -> TestOptions {
    TestOptions {
        files: admin_files(),
        ..TestOptions::default()
    }
}

fn manual(options: TestOptions) -> (TestOptions, Arc<ManualClock>) {
    let clock = ManualClock::new(START);
    (
        TestOptions {
            clock: Some(clock.clone()),
            ..options
        },
        clock,
    )
}

fn scripted(
    status: u16,
    code: &str,
    message: &str,
    business: Option<i64>,
    chat: Option<i64>,
    times: u32,
) -> ScriptedAnswer {
    ScriptedAnswer {
        status,
        errors: vec![ApiErrorEntry {
            code: code.into(),
            message: Some(message.into()),
        }],
        business_id: business,
        chat_id: chat,
        times,
        ..Default::default()
    }
}

/// Posts to `oms` and returns the ids of the deliveries made.
async fn post_ok(app: &TestApp, event: &Value) -> Vec<i64> {
    let (status, body) = app.post_event("oms", event).await;
    assert_eq!(status, 202, "{body}");
    body["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect()
}

async fn post_one(app: &TestApp, event: &Value) -> i64 {
    let ids = post_ok(app, event).await;
    assert_eq!(ids.len(), 1, "one delivery expected: {ids:?}");
    ids[0]
}

/// Posts an unsigned `note.added` event to the `crm` source.
async fn post_crm(app: &TestApp, id: &str, chat: i64, text: &str) -> i64 {
    let body = json!({"id": id, "type": "note.added", "chatId": chat, "text": text});
    let (status, answer) = app
        .post_raw(
            "/hooks/crm",
            &[("content-type", "application/json".into())],
            body.to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    answer["deliveries"][0]["id"].as_i64().unwrap()
}

fn ids(list: &Value) -> Vec<i64> {
    list["deliveries"]
        .as_array()
        .unwrap_or_else(|| panic!("no deliveries in {list}"))
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect()
}

async fn list(app: &TestApp, query: &str) -> Value {
    let (status, body) = app.admin_get(&format!("/admin/deliveries?{query}")).await;
    assert_eq!(status, 200, "?{query}: {body}");
    body
}

async fn list_ids(app: &TestApp, query: &str) -> Vec<i64> {
    ids(&list(app, query).await)
}

/// A GET with any (or no) Authorization header.
async fn get_as(app: &TestApp, path: &str, authorization: Option<&str>) -> (u16, Value) {
    let mut req = app.client.get(format!("{}{path}", app.base));
    if let Some(a) = authorization {
        req = req.insert_header(("authorization", a));
    }
    let mut resp = req.send().await.expect("request failed");
    let status = resp.status().as_u16();
    let bytes = resp.body().limit(16 << 20).await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn post_as(app: &TestApp, path: &str, authorization: Option<&str>) -> (u16, Value) {
    let mut req = app.client.post(format!("{}{path}", app.base));
    if let Some(a) = authorization {
        req = req.insert_header(("authorization", a));
    }
    let mut resp = req.send_json(&json!({})).await.expect("request failed");
    let status = resp.status().as_u16();
    let bytes = resp.body().limit(16 << 20).await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| {
        panic!("expected an error body {{\"error\":{{\"code\",\"message\"}}}}, got {body}")
    })
}

fn error_message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(error_code(body), code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "an error message: {body}"
    );
}

async fn reload(app: &TestApp) -> Value {
    let (status, body) = app.admin_post("/admin/reload", &json!({})).await;
    assert_eq!(status, 200, "reload: {body}");
    body
}

fn write(app: &TestApp, path: &str, contents: &str) {
    std::fs::write(app.root.path().join(path), contents).unwrap();
}

// ---------------------------------------------------------------- listing

#[actix_rt::test]
async fn deliveries_are_listed_by_state_business_chat_route_source_and_time() {
    let (options, clock) = manual(admin_options());
    let app = spawn_app_with(options).await;

    // T0: business 111, chat 5001, order-shipped.
    let shipped = post_one(&app, &sample_as("order_shipped", "L-1", None)).await;
    clock.advance(Duration::from_secs(60));
    // T0+60 s: business 111 chat 5002, and business 222 chat 5003.
    let delivered = post_one(&app, &sample_as("order_delivered", "L-2", None)).await;
    let refund = post_one(&app, &sample_as("return_approved", "L-3", None)).await;
    clock.advance(Duration::from_secs(60));
    // T0+120 s: a note without its text fails to render; a note from crm.
    let failed = post_one(
        &app,
        &json!({"id": "L-4", "type": "note.added", "businessId": 111, "chatId": 5001, "orderId": 1}),
    )
    .await;
    let crm = post_crm(&app, "L-5", 7001, "из CRM").await;
    for id in [shipped, delivered, refund, crm] {
        app.wait_for_state(id, "delivered").await;
    }

    let all = list(&app, "").await;
    assert_eq!(ids(&all), [shipped, delivered, refund, failed, crm]);
    assert!(all["next_after"].is_null(), "{all}");
    let row = &all["deliveries"][0];
    for (field, value) in [
        ("source", json!("oms")),
        ("event_type", json!("order.shipped")),
        ("route", json!("order-shipped")),
        ("template", json!("order_shipped")),
        ("business_id", json!(111)),
        ("chat_id", json!(5001)),
        ("state", json!("delivered")),
        ("created_at", json!(to_rfc3339(START))),
    ] {
        assert_eq!(row[field], value, "{field} of {row:#}");
    }

    assert_eq!(
        list_ids(&app, "state=delivered").await,
        [shipped, delivered, refund, crm]
    );
    assert_eq!(list_ids(&app, "state=failed").await, [failed]);
    assert_eq!(list_ids(&app, "state=queued").await, Vec::<i64>::new());
    // The failed note keeps the business and chat that rendered.
    assert_eq!(
        list_ids(&app, "business_id=111").await,
        [shipped, delivered, failed]
    );
    assert_eq!(list_ids(&app, "business_id=222").await, [refund]);
    assert_eq!(list_ids(&app, "business_id=333").await, [crm]);
    assert_eq!(list_ids(&app, "chat_id=5002").await, [delivered]);
    assert_eq!(list_ids(&app, "route=return-approved").await, [refund]);
    assert_eq!(list_ids(&app, "route=note").await, [failed]);
    assert_eq!(list_ids(&app, "source=crm").await, [crm]);
    assert_eq!(
        list_ids(&app, "source=oms").await,
        [shipped, delivered, refund, failed]
    );
    // `since` is inclusive, `until` exclusive.
    let at = |secs: i64| to_rfc3339(START + secs * 1000);
    assert_eq!(
        list_ids(&app, &format!("since={}&until={}", at(30), at(90))).await,
        [delivered, refund]
    );
    assert_eq!(
        list_ids(&app, &format!("since={}", at(60))).await,
        [delivered, refund, failed, crm]
    );
    assert_eq!(
        list_ids(&app, &format!("until={}", at(60))).await,
        [shipped]
    );
    assert_eq!(
        list_ids(
            &app,
            "business_id=111&state=delivered&route=order-shipped&chat_id=5001"
        )
        .await,
        [shipped]
    );
    assert_eq!(
        list_ids(&app, "business_id=111&route=return-approved").await,
        Vec::<i64>::new(),
        "filters combine"
    );

    for bad in [
        "state=lost",
        "since=yesterday",
        "until=2026-13-01",
        "business_id=abc",
        "colour=red",
    ] {
        let (status, body) = app.admin_get(&format!("/admin/deliveries?{bad}")).await;
        assert_eq!(status, 400, "?{bad}: {body}");
        assert_error(&body, "bad_request");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn deliveries_are_paged_with_after_and_next_after() {
    let app = spawn_app_with(admin_options()).await;
    let mut posted = Vec::new();
    for n in 0..5 {
        posted.push(
            post_one(
                &app,
                &json!({"id": format!("P-{n}"), "type": "note.added", "businessId": 111,
                        "chatId": 6100 + n, "orderId": n, "note": {"text": "x"}}),
            )
            .await,
        );
    }

    let first = list(&app, "limit=2").await;
    assert_eq!(ids(&first), posted[0..2]);
    assert_eq!(first["next_after"], posted[1], "{first}");
    let second = list(&app, &format!("limit=2&after={}", posted[1])).await;
    assert_eq!(ids(&second), posted[2..4]);
    assert_eq!(second["next_after"], posted[3]);
    let last = list(&app, &format!("limit=2&after={}", posted[3])).await;
    assert_eq!(ids(&last), posted[4..5]);
    assert!(
        last["next_after"].is_null(),
        "a short page is the last: {last}"
    );

    // A page exactly full names the last id; the page after it is empty.
    let full = list(&app, "limit=5").await;
    assert_eq!(ids(&full), posted);
    assert_eq!(full["next_after"], posted[4]);
    let empty = list(&app, &format!("limit=5&after={}", posted[4])).await;
    assert_eq!(ids(&empty), Vec::<i64>::new());
    assert!(empty["next_after"].is_null());

    // Paging composes with a filter.
    let filtered = list(&app, &format!("limit=1&after={}&chat_id=6103", posted[0])).await;
    assert_eq!(ids(&filtered), [posted[3]]);
    app.stop().await;
}

// ---------------------------------------------------------------- one delivery, events

#[actix_rt::test]
async fn a_delivery_shows_its_event_text_and_every_attempt_with_the_markets_codes() {
    let (mut options, _clock) = manual(admin_options());
    options.fake = FakeConfig {
        api_keys: vec![API_KEY.into()],
        latency_ms: 40,
        ..FakeConfig::default()
    };
    let app = spawn_app_with(options).await;
    app.market.script(scripted(
        400,
        "CHAT_NOT_FOUND",
        "Чат 5001 не найден",
        None,
        None,
        1,
    ));
    let event = sample_as("order_shipped", "S-1", None);
    let id = post_one(&app, &event).await;

    let dead = app.wait_for_state(id, "dead").await;

    let d = &dead["delivery"];
    assert_eq!(d["id"], id);
    assert_eq!(d["route"], "order-shipped");
    assert_eq!(d["business_id"], 111);
    assert_eq!(d["chat_id"], 5001);
    assert_eq!(d["attempts"], 1);
    assert!(
        d["text"]
            .as_str()
            .is_some_and(|t| t.contains("RU123456789")),
        "the rendered text is shown: {d:#}"
    );
    assert!(d["reason"]
        .as_str()
        .is_some_and(|r| r.contains("CHAT_NOT_FOUND") && r.contains("Чат 5001 не найден")));
    let attempts = dead["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{dead:#}");
    let a = &attempts[0];
    assert_eq!(a["http_status"], 400);
    assert_eq!(a["outcome"], "dead");
    assert_eq!(
        a["api_errors"],
        json!([{"code": "CHAT_NOT_FOUND", "message": "Чат 5001 не найден"}])
    );
    assert!(
        a["latency_ms"].as_i64().is_some_and(|ms| ms >= 40),
        "latency includes the Market's 40 ms: {a}"
    );
    assert_eq!(a["at"], to_rfc3339(START));
    let e = &dead["event"];
    assert_eq!(e["id"], d["event_id"]);
    assert_eq!(e["source"], "oms");
    assert_eq!(e["event_id"], "S-1");
    assert_eq!(e["type"], "order.shipped");
    assert_eq!(e["received_at"], to_rfc3339(START));
    assert_eq!(e["payload"], event);
    assert_eq!(
        e["deliveries"],
        json!([{"id": id, "route": "order-shipped", "state": "dead"}])
    );

    // The operator sends it again: the second attempt is listed after the first.
    let (status, retried) = app
        .admin_post(&format!("/admin/deliveries/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["text_changed"], false, "same template: {retried}");
    let done = app.wait_for_state(id, "delivered").await;
    let outcomes: Vec<(Value, Value)> = done["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["http_status"].clone(), a["outcome"].clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (json!(400), json!("dead")),
            (json!(200), json!("delivered"))
        ]
    );
    assert_eq!(done["attempts"][1]["api_errors"], json!([]));
    assert!(done["delivery"]["delivered_at"].is_string(), "{done:#}");

    for (path, status) in [
        ("/admin/deliveries/999999", 404),
        ("/admin/deliveries/abc", 400),
    ] {
        let (got, body) = app.admin_get(path).await;
        assert_eq!(got, status, "{path}: {body}");
        error_code(&body);
    }
    app.stop().await;
}

#[actix_rt::test]
async fn an_event_is_shown_with_all_its_deliveries_by_internal_id_and_by_source_id() {
    let app = spawn_app_with(admin_options()).await;
    let event = json!({"id": "M-1", "type": "multi.event", "businessId": 111, "chatId": 6001, "text": "две доставки"});
    let made = post_ok(&app, &event).await;
    assert_eq!(made.len(), 2, "both routes match (continue = true)");
    for id in &made {
        app.wait_for_state(*id, "delivered").await;
    }
    let internal = app.delivery(made[0]).await["delivery"]["event_id"]
        .as_i64()
        .unwrap();

    let (status, by_id) = app.admin_get(&format!("/admin/events/{internal}")).await;
    assert_eq!(status, 200, "{by_id}");
    let (status, by_source) = app.admin_get("/admin/events?source=oms&event_id=M-1").await;
    assert_eq!(status, 200, "{by_source}");

    assert_eq!(by_id, by_source);
    assert_eq!(by_id["id"], internal);
    assert_eq!(by_id["source"], "oms");
    assert_eq!(by_id["event_id"], "M-1");
    assert_eq!(by_id["type"], "multi.event");
    assert_eq!(by_id["payload"], event);
    assert!(by_id["received_at"].is_string());
    assert_eq!(
        by_id["deliveries"],
        json!([
            {"id": made[0], "route": "multi-a", "state": "delivered"},
            {"id": made[1], "route": "multi-b", "state": "delivered"},
        ])
    );
    let chats: BTreeSet<i64> = app.market.delivered().iter().map(|r| r.chat_id).collect();
    assert_eq!(chats, BTreeSet::from([6001, 6002]));

    for (path, status) in [
        ("/admin/events/999999".to_owned(), 404),
        ("/admin/events?source=oms&event_id=nope".to_owned(), 404),
        ("/admin/events?source=crm&event_id=M-1".to_owned(), 404),
        ("/admin/events?source=oms".to_owned(), 400),
    ] {
        let (got, body) = app.admin_get(&path).await;
        assert_eq!(got, status, "{path}: {body}");
        error_code(&body);
    }
    app.stop().await;
}

// ---------------------------------------------------------------- retry

#[actix_rt::test]
async fn retrying_a_failed_delivery_after_fixing_the_template_sends_the_new_text() {
    let app = spawn_app_with(admin_options()).await;
    let id = post_one(
        &app,
        &json!({"id": "F-1", "type": "note.added", "businessId": 111, "chatId": 5010, "orderId": 77}),
    )
    .await;
    let failed = app.delivery(id).await;
    assert_eq!(failed["delivery"]["state"], "failed");
    assert!(failed["delivery"]["text"].is_null());

    // Still broken: the retry answers 422 and the delivery stays failed.
    let (status, body) = app
        .admin_post(&format!("/admin/deliveries/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_error(&body, "render_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("note.text"),
        "{body}"
    );
    assert_eq!(
        (body["id"].as_i64(), body["state"].as_str()),
        (Some(id), Some("failed"))
    );
    assert_eq!(app.delivery(id).await["delivery"]["state"], "failed");

    write(&app, "templates/note.hbs", "Заметка к заказу №{{orderId}}");
    assert_eq!(reload(&app).await["changed"], true);
    let (status, retried) = app
        .admin_post(&format!("/admin/deliveries/{id}/retry"), &json!({}))
        .await;

    assert_eq!(status, 200, "{retried}");
    assert_eq!(
        retried,
        json!({"id": id, "state": "queued", "text": "Заметка к заказу №77", "text_changed": true})
    );
    let done = app.wait_for_state(id, "delivered").await;
    assert_eq!(done["delivery"]["text"], "Заметка к заказу №77");
    assert!(done["delivery"]["reason"].is_null(), "{done:#}");
    let sent = app.market.delivered();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].chat_id, sent[0].message.as_str()),
        (5010, "Заметка к заказу №77")
    );

    // A delivered delivery cannot be retried; an unknown one is not found.
    let (status, body) = app
        .admin_post(&format!("/admin/deliveries/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "conflict");
    let (status, body) = app
        .admin_post("/admin/deliveries/999999/retry", &json!({}))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "not_found");
    app.stop().await;
}

#[actix_rt::test]
async fn retrying_by_filter_queues_every_match_and_reports_what_still_fails() {
    let app = spawn_app_with(admin_options()).await;
    let mut notes = Vec::new();
    for n in 0..3 {
        notes.push(
            post_one(
                &app,
                &json!({"id": format!("N-{n}"), "type": "note.added", "businessId": 111,
                        "chatId": 5020 + n, "orderId": 100 + n}),
            )
            .await,
        );
    }
    let mut shipped = sample_as("order_shipped", "N-ship", Some(5030));
    shipped["tracking"]
        .as_object_mut()
        .unwrap()
        .remove("number");
    let other = post_one(&app, &shipped).await;
    assert_eq!(list_ids(&app, "state=failed").await.len(), 4);

    // Only failed, dead or cancelled deliveries can be retried.
    let (status, body) = app
        .admin_post("/admin/deliveries/retry", &json!({"state": "delivered"}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "bad_request");
    let (status, body) = app
        .admin_post("/admin/deliveries/retry", &json!({"colour": "red"}))
        .await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");

    write(&app, "templates/note.hbs", "Заметка к заказу №{{orderId}}");
    reload(&app).await;
    let (status, answer) = app
        .admin_post("/admin/deliveries/retry", &json!({"route": "note"}))
        .await;

    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["queued"], 3, "{answer}");
    assert_eq!(answer["still_failing"], 0);
    let retried: Vec<i64> = answer["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["state"], "queued", "{d}");
            assert_eq!(d["text_changed"], true, "{d}");
            d["id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(retried, notes);
    for (n, id) in notes.iter().enumerate() {
        let done = app.wait_for_state(*id, "delivered").await;
        assert_eq!(
            done["delivery"]["text"],
            format!("Заметка к заказу №{}", 100 + n)
        );
    }
    assert_eq!(app.delivery(other).await["delivery"]["state"], "failed");

    // Every failed and dead one needs "all"; this one still fails.
    let (status, answer) = app
        .admin_post("/admin/deliveries/retry", &json!({"all": true}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["matched"], 1, "{answer}");
    assert_eq!(answer["queued"], 0, "{answer}");
    assert_eq!(answer["still_failing"], 1);
    assert_eq!(answer["deliveries"][0]["id"], other);
    assert_eq!(answer["deliveries"][0]["state"], "failed");
    assert!(answer["deliveries"][0]["error"]
        .as_str()
        .is_some_and(|e| e.contains("tracking.number")));
    assert_eq!(app.market.delivered().len(), 3);
    app.stop().await;
}

#[actix_rt::test]
async fn retrying_many_needs_a_filter_previews_and_leaves_cancelled_ones_unless_named() {
    let (mut options, clock) = manual(admin_options());
    options.tweak = Some(Box::new(|s| s.market.hourly_limit = 1));
    let app = spawn_app_with(options).await;
    let first = post_one(&app, &sample_as("order_shipped", "R-1", Some(5401))).await;
    app.wait_for_state(first, "delivered").await;
    // The quota is used up: this one waits, and an operator cancels it.
    let cancelled = post_one(&app, &sample_as("order_shipped", "R-2", Some(5402))).await;
    let (status, _) = app
        .admin_post(&format!("/admin/deliveries/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let failed = post_one(
        &app,
        &json!({"id": "R-3", "type": "note.added", "businessId": 111, "chatId": 5403, "orderId": 1}),
    )
    .await;
    assert_eq!(app.delivery(failed).await["delivery"]["state"], "failed");

    // A bare request names nothing: refused, with what to say instead.
    let (status, body) = app.admin_post("/admin/deliveries/retry", &json!({})).await;
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "bad_request");
    assert!(error_message(&body).contains("\"all\": true"), "{body}");

    // A dry run counts and shows, and changes nothing.
    let (status, preview) = app
        .admin_post(
            "/admin/deliveries/retry",
            &json!({"all": true, "dry_run": true}),
        )
        .await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["dry_run"], true);
    assert_eq!(preview["matched"], 1, "only the failed one: {preview:#}");
    assert_eq!(preview["states"], json!(["failed", "dead"]));
    assert_eq!(preview["sample"][0]["id"], failed);
    assert_eq!(app.delivery(failed).await["delivery"]["state"], "failed");
    assert_eq!(
        app.delivery(cancelled).await["delivery"]["state"],
        "cancelled"
    );

    // "all": the failed one is tried again; the cancelled one stays cancelled.
    let (status, answer) = app
        .admin_post("/admin/deliveries/retry", &json!({"all": true}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["matched"].as_i64(), answer["queued"].as_i64()),
        (Some(1), Some(0)),
        "{answer:#}"
    );
    assert_eq!(answer["still_failing"], 1);
    assert_eq!(
        app.delivery(cancelled).await["delivery"]["state"],
        "cancelled"
    );

    // Named by state, the cancelled one goes again, in the next window.
    let (status, answer) = app
        .admin_post("/admin/deliveries/retry", &json!({"state": "cancelled"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["queued"], 1, "{answer:#}");
    assert_eq!(answer["deliveries"][0]["id"], cancelled);
    clock.advance(Duration::from_secs(3_601));
    app.wait_for_state(cancelled, "delivered").await;
    app.stop().await;
}

// ---------------------------------------------------------------- cancel

#[actix_rt::test]
async fn a_cancelled_queued_delivery_is_never_sent() {
    let (mut options, clock) = manual(admin_options());
    options.tweak = Some(Box::new(|s| s.market.hourly_limit = 1));
    let app = spawn_app_with(options).await;
    let first = post_one(&app, &sample_as("order_shipped", "C-1", Some(5101))).await;
    app.wait_for_state(first, "delivered").await;
    // The quota (1 an hour) is used up: this one waits in the queue.
    let waiting = post_one(&app, &sample_as("order_shipped", "C-2", Some(5102))).await;
    assert_eq!(app.delivery(waiting).await["delivery"]["state"], "queued");

    let (status, body) = app
        .admin_post(&format!("/admin/deliveries/{waiting}/cancel"), &json!({}))
        .await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"id": waiting, "state": "cancelled"}));
    let view = app.delivery(waiting).await;
    assert_eq!(view["delivery"]["state"], "cancelled");
    assert!(view["delivery"]["reason"].is_string(), "{view:#}");
    assert_eq!(view["attempts"], json!([]));
    // Cancelled, delivered and unknown deliveries cannot be cancelled (again).
    for id in [waiting, first] {
        let (status, body) = app
            .admin_post(&format!("/admin/deliveries/{id}/cancel"), &json!({}))
            .await;
        assert_eq!(status, 409, "{body}");
        assert_error(&body, "conflict");
    }

    // The next window opens: a later message goes, the cancelled one does not.
    clock.advance(Duration::from_secs(3_601));
    let later = post_one(&app, &sample_as("order_shipped", "C-3", Some(5103))).await;
    app.wait_for_state(later, "delivered").await;
    let chats: Vec<i64> = app.market.requests().iter().map(|r| r.chat_id).collect();
    assert_eq!(chats, [5101, 5103], "the cancelled message was never sent");
    assert_eq!(
        app.delivery(waiting).await["delivery"]["state"],
        "cancelled"
    );

    // An operator may still send it later, on its own quota turn.
    let (status, body) = app
        .admin_post(&format!("/admin/deliveries/{waiting}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text_changed"], false);
    clock.advance(Duration::from_secs(3_601));
    app.wait_for_state(waiting, "delivered").await;
    app.stop().await;
}

#[actix_rt::test]

async fn cancelling_an_unknown_delivery_is_not_found() {
    let app = spawn_app().await;
    let (status, body) = app
        .admin_post("/admin/deliveries/999999/cancel", &json!({}))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "not_found");
    app.stop().await;
}

// ---------------------------------------------------------------- queue

#[actix_rt::test]
async fn the_queue_shows_each_business_with_its_quota_and_drain_estimate() {
    let (mut options, clock) = manual(admin_options());
    options.tweak = Some(Box::new(|s| s.market.hourly_limit = 2));
    let app = spawn_app_with(options).await;
    // Business 111: one dead (400), one delivered: both count for the quota.
    app.market.script(scripted(
        400,
        "CHAT_NOT_FOUND",
        "нет чата",
        Some(111),
        Some(5201),
        1,
    ));
    let dead = post_one(&app, &sample_as("order_shipped", "Q-1", Some(5201))).await;
    app.wait_for_state(dead, "dead").await;
    let sent = post_one(&app, &sample_as("order_shipped", "Q-2", Some(5202))).await;
    app.wait_for_state(sent, "delivered").await;
    // Business 222's key is refused: held.
    app.market.script(scripted(
        401,
        "UNAUTHORIZED",
        "Api-Key is invalid",
        Some(222),
        None,
        10,
    ));
    let held = post_one(&app, &sample_as("return_approved", "Q-h", None)).await;
    app.wait_for_state(held, "held").await;
    // Three more for 111 wait for the next window.
    let mut waiting = Vec::new();
    for n in 3..6 {
        waiting.push(
            post_one(
                &app,
                &sample_as("order_shipped", &format!("Q-{n}"), Some(5200 + n)),
            )
            .await,
        );
    }

    let (status, queue) = app.admin_get("/admin/queue").await;

    assert_eq!(status, 200, "{queue}");
    let businesses = queue["businesses"].as_array().unwrap();
    assert_eq!(businesses.len(), 2, "{queue:#}");
    assert_eq!(
        businesses[0],
        json!({
            "business_id": 111, "queued": 3, "sending": 0, "held": 0, "dead": 1, "failed": 0,
            "oldest_queued_at": to_rfc3339(START),
            "waiting_for_chat_turn": 0, "waiting_for_retry_time": 0, "waiting_for_pause": 0,
            "waiting_for_quota": 3,
            "paused_until": null, "pause_reason": null,
            "key_refused": false, "key_refused_reason": null,
            "sent_in_window": 2, "quota_limit": 2, "quota_window_secs": 3600, "quota_left": 0,
            "quota_next_free_at": to_rfc3339(START + 3_600_000),
            // 3 waiting at 2 an hour: two when the window's sends expire (in
            // 3600 s), the last one window later.
            "drain_estimate_secs": 7200,
        }),
        "{queue:#}"
    );
    let b222 = &businesses[1];
    assert_eq!(b222["business_id"], 222);
    assert_eq!(
        (b222["held"].as_i64(), b222["queued"].as_i64()),
        (Some(1), Some(0))
    );
    assert_eq!(
        b222["sent_in_window"], 1,
        "the refused request counts: {b222}"
    );
    assert_eq!(b222["quota_left"], 1);
    assert_eq!(b222["key_refused"], true, "{b222}");
    assert!(
        b222["key_refused_reason"]
            .as_str()
            .is_some_and(|r| r.contains("401")),
        "{b222}"
    );
    assert_eq!(
        b222["drain_estimate_secs"],
        Value::Null,
        "nothing drains until the key is fixed"
    );

    // Ten minutes on: the same backlog drains ten minutes sooner.
    clock.advance(Duration::from_secs(600));
    let (_, later) = app.admin_get("/admin/queue").await;
    let b111 = &later["businesses"][0];
    assert_eq!(b111["queued"], 3, "{later:#}");
    assert_eq!(b111["quota_left"], 0);
    assert_eq!(b111["drain_estimate_secs"], 6600, "{later:#}");
    for id in &waiting {
        assert_eq!(app.delivery(*id).await["delivery"]["state"], "queued");
    }

    // The window passes: two go, one is left, and the estimate follows.
    clock.advance(Duration::from_secs(3_001));
    app.wait_for_state(waiting[0], "delivered").await;
    app.wait_for_state(waiting[1], "delivered").await;
    let (_, after) = app.admin_get("/admin/queue").await;
    let b111 = &after["businesses"][0];
    assert_eq!(b111["queued"], 1, "{after:#}");
    assert_eq!(b111["sent_in_window"], 2);
    assert_eq!(b111["quota_left"], 0);
    assert_eq!(b111["drain_estimate_secs"], 3600, "{after:#}");
    app.stop().await;
}

#[actix_rt::test]
async fn the_queue_shows_a_business_the_market_paused_and_what_waits_behind_a_chat() {
    let (mut options, clock) = manual(admin_options());
    // The Market allows 2 an hour; chatbridge's own limit is higher, so the
    // Market's "Remaining: 0" is what stops it.
    options.fake.hourly_limit = 2;
    let app = spawn_app_with(options).await;
    for n in 1..=2 {
        let id = post_one(
            &app,
            &sample_as("order_shipped", &format!("P-{n}"), Some(5500 + n)),
        )
        .await;
        app.wait_for_state(id, "delivered").await;
    }

    // Nothing is open, but the quota is used and the Market paused us.
    let (status, queue) = app.admin_get("/admin/queue").await;
    assert_eq!(status, 200, "{queue}");
    let b111 = &queue["businesses"][0];
    assert_eq!(
        b111["business_id"], 111,
        "listed while nothing is open: {queue:#}"
    );
    assert_eq!(b111["sent_in_window"], 2, "{b111:#}");
    assert_eq!(b111["queued"], 0);
    let first_pause = b111["paused_until"].clone();
    assert!(first_pause.is_string(), "{b111:#}");
    assert!(
        b111["pause_reason"]
            .as_str()
            .is_some_and(|r| r.contains("Remaining: 0")),
        "{b111:#}"
    );
    assert_eq!(b111["drain_estimate_secs"], 0, "nothing to drain");

    // Two more for one chat: one waits for the pause, one for its chat turn.
    let third = post_one(&app, &sample_as("order_shipped", "P-3", Some(5503))).await;
    let fourth = post_one(&app, &sample_as("order_delivered", "P-4", Some(5503))).await;
    let (_, queue) = app.admin_get("/admin/queue").await;
    let b111 = &queue["businesses"][0];
    assert_eq!(b111["queued"], 2, "{b111:#}");
    assert_eq!(b111["waiting_for_pause"], 1, "{b111:#}");
    assert_eq!(b111["waiting_for_chat_turn"], 1, "{b111:#}");
    let estimate = b111["drain_estimate_secs"].as_i64().unwrap();
    assert!(
        (3_599..=3_602).contains(&estimate),
        "the pause (an hour) counts, not 0: {b111:#}"
    );

    // The pause ends: both go, in order; their two sends use the new
    // window up, so the pause shown is the next one.
    clock.advance(Duration::from_secs(3_602));
    app.wait_for_state(third, "delivered").await;
    app.wait_for_state(fourth, "delivered").await;
    let (_, queue) = app.admin_get("/admin/queue").await;
    let b111 = &queue["businesses"][0];
    assert_eq!(b111["queued"], 0, "{b111:#}");
    assert!(b111["paused_until"].is_string(), "{b111:#}");
    assert_ne!(b111["paused_until"], first_pause, "{b111:#}");
    app.stop().await;
}

// ---------------------------------------------------------------- auth

#[actix_rt::test]
async fn every_admin_call_needs_the_bearer_token_and_a_wrong_one_is_told_from_a_missing_one() {
    let app = spawn_app().await;
    let gets = [
        "/admin/deliveries",
        "/admin/deliveries/1",
        "/admin/events/1",
        "/admin/events?source=oms&event_id=x",
        "/admin/queue",
    ];
    let posts = [
        "/admin/deliveries/1/retry",
        "/admin/deliveries/retry",
        "/admin/deliveries/1/cancel",
        "/admin/reload",
    ];
    // No bearer token at all (absent, another scheme, empty): "missing";
    // a bearer token that is not this instance's: "not accepted".
    let refused = [
        (None, "token_missing"),
        (Some(ADMIN_TOKEN.to_owned()), "token_missing"),
        (Some(format!("Basic {ADMIN_TOKEN}")), "token_missing"),
        (Some("Bearer ".to_owned()), "token_missing"),
        (Some("Bearer wrong-token".to_owned()), "token_not_accepted"),
        (Some(format!("Bearer {ADMIN_TOKEN}x")), "token_not_accepted"),
    ];
    for (auth, code) in &refused {
        for path in gets {
            let (status, body) = get_as(&app, path, auth.as_deref()).await;
            assert_eq!(status, 401, "GET {path} with {auth:?}: {body}");
            assert_error(&body, code);
        }
        for path in posts {
            let (status, body) = post_as(&app, path, auth.as_deref()).await;
            assert_eq!(status, 401, "POST {path} with {auth:?}: {body}");
            assert_error(&body, code);
        }
    }
    let (status, _) = get_as(
        &app,
        "/admin/deliveries",
        Some(&format!("Bearer {ADMIN_TOKEN}")),
    )
    .await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[actix_rt::test]
async fn with_no_admin_token_the_admin_api_is_off_with_a_json_404() {
    let tweaks: [Box<dyn Fn(&mut chatbridge::settings::Settings) + Send + Sync>; 2] = [
        Box::new(|s| s.admin.token = None),
        Box::new(|s| s.admin.token = Some(String::new().into())),
    ];
    for tweak in tweaks {
        let app = spawn_app_with(TestOptions {
            tweak: Some(tweak),
            ..TestOptions::default()
        })
        .await;
        for auth in [
            None,
            Some(format!("Bearer {ADMIN_TOKEN}")),
            Some("Bearer ".into()),
        ] {
            for path in ["/admin/deliveries", "/admin/queue", "/admin/events/1"] {
                let (status, body) = get_as(&app, path, auth.as_deref()).await;
                assert_eq!(status, 404, "GET {path} with {auth:?}: {body}");
                assert_error(&body, "not_found");
            }
            let (status, body) = post_as(&app, "/admin/reload", auth.as_deref()).await;
            assert_eq!(status, 404, "POST /admin/reload: {body}");
            assert_error(&body, "not_found");
        }
        // The webhooks still work.
        let (status, body) = app.post_event("oms", &sample("order_shipped")).await;
        assert_eq!(status, 202, "{body}");
        app.stop().await;
    }
}

// ---------------------------------------------------------------- OpenAPI

/// Method and path of every endpoint the service implements (src/admin/mod.rs, src/app.rs).
const IMPLEMENTED: [(&str, &str); 14] = [
    ("get", "/admin/deliveries"),
    ("post", "/admin/deliveries/retry"),
    ("get", "/admin/deliveries/{id}"),
    ("post", "/admin/deliveries/{id}/retry"),
    ("post", "/admin/deliveries/{id}/cancel"),
    ("get", "/admin/events/{id}"),
    ("get", "/admin/events"),
    ("get", "/admin/queue"),
    ("post", "/admin/reload"),
    ("get", "/admin/openapi.json"),
    ("post", "/hooks/{source}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

/// Follows local `$ref`s (also through a one-element `allOf`).
fn resolve<'a>(doc: &'a Value, mut node: &'a Value) -> &'a Value {
    for _ in 0..16 {
        if let Some(r) = node.get("$ref").and_then(Value::as_str) {
            node = doc
                .pointer(r.strip_prefix('#').expect("a local $ref"))
                .unwrap_or_else(|| panic!("dangling $ref {r}"));
        } else if let Some([only]) = node
            .get("allOf")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            node = only;
        } else {
            return node;
        }
    }
    panic!("$ref cycle")
}

fn collect_refs<'a>(node: &'a Value, out: &mut Vec<&'a str>) {
    match node {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    out.extend(v.as_str());
                } else {
                    collect_refs(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// Every key of `value` is a property of `schema`, and every required
/// property is present.
fn check_fields(doc: &Value, schema_name: &str, value: &Value) {
    let schema = resolve(doc, &doc["components"]["schemas"][schema_name]);
    let properties = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {schema_name} has no properties"));
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("{schema_name}: not an object: {value}"));
    for key in object.keys() {
        assert!(
            properties.contains_key(key),
            "{schema_name} does not describe the field {key:?} the API returns"
        );
    }
    for required in schema["required"].as_array().into_iter().flatten() {
        let required = required.as_str().unwrap();
        assert!(
            object.contains_key(required),
            "{schema_name} requires {required:?}, which the API does not return: {value}"
        );
    }
}

#[actix_rt::test]
async fn the_openapi_document_describes_every_endpoint_and_the_fields_returned() {
    let app = spawn_app_with(admin_options()).await;
    let mut resp = app
        .client
        .get(format!("{}/admin/openapi.json", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "public, no token needed");
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let doc: Value = serde_json::from_slice(&resp.body().limit(1 << 20).await.unwrap())
        .expect("the OpenAPI document is JSON");

    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "OpenAPI 3.x: {}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    for (method, path) in IMPLEMENTED {
        let operation = &doc["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is not described");
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty()),
            "{method} {path} has no responses"
        );
        if path.starts_with("/admin/") && path != "/admin/openapi.json" {
            for status in ["401", "404"] {
                assert!(
                    operation["responses"][status].is_object(),
                    "{method} {path} does not list {status}"
                );
            }
            let security = operation.get("security").unwrap_or(&doc["security"]);
            assert!(
                security.as_array().is_some_and(|s| !s.is_empty()),
                "{method} {path} must require the token"
            );
        }
    }
    let described: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        described,
        IMPLEMENTED.len(),
        "no endpoint the service lacks"
    );
    for (method, path, status) in [
        ("post", "/admin/deliveries/{id}/retry", "409"),
        ("post", "/admin/deliveries/{id}/retry", "422"),
        ("post", "/admin/deliveries/{id}/cancel", "409"),
        ("post", "/admin/reload", "422"),
        ("get", "/admin/deliveries", "400"),
    ] {
        assert!(
            doc["paths"][path][method]["responses"][status].is_object(),
            "{method} {path} does not list {status}"
        );
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert!(
        schemes
            .values()
            .any(|s| s["type"] == "http" && s["scheme"] == "bearer"),
        "a bearer security scheme: {schemes:?}"
    );
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    for r in refs {
        assert!(
            doc.pointer(r.trim_start_matches('#')).is_some(),
            "dangling $ref {r}"
        );
    }
    let error = resolve(&doc, &doc["components"]["schemas"]["Error"]);
    let detail = resolve(&doc, &error["properties"]["error"]);
    assert!(
        detail["properties"]["code"].is_object() && detail["properties"]["message"].is_object()
    );

    // The fields the API really returns are the ones described.
    let dead_chat = 5301;
    app.market.script(scripted(
        400,
        "CHAT_NOT_FOUND",
        "нет",
        None,
        Some(dead_chat),
        1,
    ));
    let dead = post_one(&app, &sample_as("order_shipped", "O-1", Some(dead_chat))).await;
    let view = app.wait_for_state(dead, "dead").await;
    let failed = post_one(
        &app,
        &json!({"id": "O-2", "type": "note.added", "businessId": 111, "chatId": 5302, "orderId": 1}),
    )
    .await;
    check_fields(&doc, "DeliveryView", &view);
    check_fields(&doc, "Delivery", &view["delivery"]);
    check_fields(&doc, "Attempt", &view["attempts"][0]);
    check_fields(&doc, "ApiErrorEntry", &view["attempts"][0]["api_errors"][0]);
    check_fields(&doc, "Event", &view["event"]);
    check_fields(&doc, "DeliverySummary", &view["event"]["deliveries"][0]);
    check_fields(&doc, "Delivery", &app.delivery(failed).await["delivery"]);
    let listed = list(&app, "limit=1").await;
    check_fields(&doc, "DeliveryList", &listed);
    let (_, queue) = app.admin_get("/admin/queue").await;
    check_fields(&doc, "QueueSummary", &queue);
    check_fields(&doc, "BusinessQueue", &queue["businesses"][0]);
    let (_, retried) = app
        .admin_post(&format!("/admin/deliveries/{dead}/retry"), &json!({}))
        .await;
    check_fields(&doc, "Retried", &retried);
    let (_, still) = app
        .admin_post(&format!("/admin/deliveries/{failed}/retry"), &json!({}))
        .await;
    check_fields(&doc, "RetryRenderFailed", &still);
    let (_, preview) = app
        .admin_post(
            "/admin/deliveries/retry",
            &json!({"all": true, "dry_run": true}),
        )
        .await;
    check_fields(&doc, "RetryPreview", &preview);
    let (_, many) = app
        .admin_post("/admin/deliveries/retry", &json!({"all": true}))
        .await;
    check_fields(&doc, "RetryMatchingResult", &many);
    check_fields(&doc, "Retried", &many["deliveries"][0]);
    let (_, applied) = app.admin_post("/admin/reload", &json!({})).await;
    check_fields(&doc, "ReloadApplied", &applied);
    let (_, webhook) = app
        .post_event("oms", &sample_as("order_delivered", "O-3", None))
        .await;
    check_fields(&doc, "WebhookAccepted", &webhook);
    let (_, readyz) = get_as(&app, "/readyz", None).await;
    check_fields(&doc, "Readiness", &readyz);
    check_fields(&doc, "ReloadStatus", &readyz["reload"]);
    write(&app, "templates/note.hbs", "{{#if orderId}}");
    let (status, refused) = app.admin_post("/admin/reload", &json!({})).await;
    assert_eq!(status, 422);
    check_fields(&doc, "ReloadRefused", &refused);
    let (_, missing) = app.admin_get("/admin/deliveries/999999").await;
    check_fields(&doc, "Error", &missing);
    check_fields(&doc, "ErrorDetail", &missing["error"]);
    app.stop().await;
}
