//! Routes by order and by return: chatbridge finds the chat with
//! `chats/new`, once per order (or return), remembers it in the store, and
//! keeps each conversation in order from its first message on.

use std::time::{Duration, Instant};

use chatbridge::clock::ManualClock;
use chatbridge::market::fake::{FakeConfig, FakeMethod, ScriptedAnswer};
use chatbridge::store::ApiErrorEntry;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::helpers::*;

/// `note.order` events go to the chat of `orderId`, `note.return` events to
/// the chat of `returnId`, `note.chat` events to `chatId`; the text is
/// `msg {{seq}}`.
fn note_files() -> Vec<(String, String)> {
    vec![
        (
            "config/routes.toml".into(),
            r#"
[[routes]]
name = "by-order"
event = "note.order"
template = "note"
business_id = "{{businessId}}"
order_id = "{{orderId}}"

[[routes]]
name = "by-return"
event = "note.return"
template = "note"
business_id = "{{businessId}}"
return_id = "{{returnId}}"

[[routes]]
name = "by-chat"
event = "note.chat"
template = "note"
business_id = "{{businessId}}"
chat_id = "{{chatId}}"
"#
            .into(),
        ),
        ("templates/note.hbs".into(), "msg {{seq}}".into()),
    ]
}

fn note_options(fake: FakeConfig) -> TestOptions {
    TestOptions {
        fake: FakeConfig {
            api_keys: vec![API_KEY.into()],
            ..fake
        },
        files: note_files(),
        ..TestOptions::default()
    }
}

fn order_note(order: i64, seq: usize) -> Value {
    json!({"id": format!("o-{order}-{seq}-{}", rand_id()), "type": "note.order", "businessId": 111, "orderId": order, "seq": seq})
}

/// Posts and returns the one delivery's id.
async fn post_note(app: &TestApp, event: &Value) -> i64 {
    let (status, body) = app.post_event("oms", event).await;
    assert_eq!(status, 202, "{body}");
    body["deliveries"][0]["id"].as_i64().expect("one delivery")
}

fn lookups(app: &TestApp) -> Vec<chatbridge::market::fake::ReceivedRequest> {
    app.market.requests_of(FakeMethod::CreateChat)
}

#[actix_rt::test]
async fn twenty_concurrent_events_for_a_new_order_make_one_chats_new_call_and_arrive_in_order() {
    // Latency keeps each call in flight while the next dispatcher rounds
    // run, so a second lookup or an overtaking message would show.
    let app = spawn_app_with(note_options(FakeConfig {
        latency_ms: 40,
        ..FakeConfig::default()
    }))
    .await;
    let ids: Vec<i64> = futures_util::stream::iter((0..20).map(|seq| {
        let app = &app;
        async move { post_note(app, &order_note(4242, seq)).await }
    }))
    .buffer_unordered(20)
    .collect()
    .await;

    let delivered = app.wait_for_delivered(20).await;
    assert_eq!(delivered.len(), 20, "all 20 messages arrive");
    let calls = lookups(&app);
    assert_eq!(
        calls.len(),
        1,
        "one chats/new call for the order: {calls:#?}"
    );
    assert_eq!(calls[0].context, Some(("ORDER".into(), 4242)));
    let chat = calls[0].chat_id;
    assert!(chat > 0);
    assert!(
        delivered
            .iter()
            .all(|m| m.chat_id == chat && m.business_id == 111),
        "every message went to the order's chat"
    );
    // In the order the events were accepted: delivery ids ascend with
    // acceptance, and each delivery's text names its event's seq.
    let mut by_acceptance = ids.clone();
    by_acceptance.sort();
    let mut expected = Vec::new();
    for id in by_acceptance {
        let d = app.delivery(id).await;
        assert_eq!(d["delivery"]["order_id"], 4242);
        assert_eq!(d["delivery"]["chat_id"], chat);
        expected.push(d["delivery"]["text"].as_str().unwrap().to_owned());
    }
    let sent: Vec<String> = delivered.iter().map(|m| m.message.clone()).collect();
    assert_eq!(
        sent, expected,
        "messages reached the chat in acceptance order"
    );
    let peak = app.market.stats().max_in_flight_seen[&111];
    assert!(peak <= 4, "at most 4 requests in flight, saw {peak}");
    app.stop().await;
}

#[actix_rt::test]
async fn the_chat_of_an_order_is_remembered_across_a_restart() {
    let app = spawn_app_with(note_options(FakeConfig::default())).await;
    let first = post_note(&app, &order_note(777, 1)).await;
    app.wait_for_state(first, "delivered").await;
    assert_eq!(lookups(&app).len(), 1);

    let app = app.restart().await;
    let second = post_note(&app, &order_note(777, 2)).await;
    let body = app.wait_for_state(second, "delivered").await;
    assert_eq!(
        lookups(&app).len(),
        1,
        "no second chats/new call after a restart"
    );
    let delivered = app.market.delivered();
    assert_eq!(delivered.len(), 2);
    assert_eq!(delivered[0].chat_id, delivered[1].chat_id);
    assert_eq!(body["delivery"]["chat_id"], delivered[1].chat_id);
    // Known at once: the second delivery made no lookup attempt.
    let methods: Vec<&str> = body["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["send"]);
    app.stop().await;
}

#[actix_rt::test]
async fn a_return_route_finds_the_return_chat_never_the_order_chat_of_the_same_number() {
    let app = spawn_app_with(note_options(FakeConfig::default())).await;
    let order = post_note(&app, &order_note(555, 1)).await;
    app.wait_for_state(order, "delivered").await;
    let ret = post_note(
        &app,
        &json!({"id": "r-555", "type": "note.return", "businessId": 111, "returnId": 555, "seq": 2}),
    )
    .await;
    let body = app.wait_for_state(ret, "delivered").await;
    assert_eq!(body["delivery"]["return_id"], 555);
    assert!(body["delivery"].get("order_id").is_none());

    let calls = lookups(&app);
    let contexts: Vec<_> = calls.iter().map(|c| c.context.clone().unwrap()).collect();
    assert_eq!(
        contexts,
        [("ORDER".to_owned(), 555), ("RETURN".to_owned(), 555)],
        "the return asked for its own chat"
    );
    assert_ne!(calls[0].chat_id, calls[1].chat_id);
    let delivered = app.market.delivered();
    assert_eq!(
        delivered[1].chat_id, calls[1].chat_id,
        "sent to the return's chat"
    );
    // The admin API filters by order and by return.
    let (_, list) = app.admin_get("/admin/deliveries?return_id=555").await;
    let ids: Vec<i64> = list["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [ret]);
    let (_, list) = app.admin_get("/admin/deliveries?order_id=555").await;
    assert_eq!(list["deliveries"][0]["id"], order);
    assert_eq!(list["deliveries"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn an_unknown_order_makes_the_delivery_dead_with_the_codes_and_the_order_named() {
    let app = spawn_app_with(note_options(FakeConfig::default())).await;
    app.market.script(ScriptedAnswer {
        status: 404,
        errors: vec![ApiErrorEntry {
            code: "NOT_FOUND".into(),
            message: Some("order not found".into()),
        }],
        method: FakeMethod::CreateChat,
        context_id: Some(999),
        ..ScriptedAnswer::default()
    });
    let id = post_note(&app, &order_note(999, 1)).await;
    let body = app.wait_for_state(id, "dead").await;
    let reason = body["delivery"]["reason"].as_str().unwrap();
    assert!(reason.contains("order 999"), "{reason}");
    assert!(reason.contains("NOT_FOUND"), "{reason}");
    assert!(reason.contains("order not found"), "{reason}");
    let attempt = &body["attempts"][0];
    assert_eq!(attempt["method"], "chats/new");
    assert_eq!(attempt["http_status"], 404);
    assert_eq!(attempt["api_errors"][0]["code"], "NOT_FOUND");
    assert!(app.market.delivered().is_empty(), "nothing was sent");

    // Nothing was remembered: an operator's retry asks the Market again
    // (the order exists now) and the message goes out.
    let (status, retried) = app
        .admin_post(&format!("/admin/deliveries/{id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{retried}");
    let body = app.wait_for_state(id, "delivered").await;
    assert_eq!(lookups(&app).len(), 2);
    assert_eq!(body["delivery"]["chat_id"], lookups(&app)[1].chat_id);
    app.stop().await;
}

#[actix_rt::test]
async fn a_420_on_chats_new_waits_for_its_window_while_sends_to_known_chats_go_on() {
    let start = 1_795_000_000_000;
    let clock = ManualClock::new(start);
    let app = spawn_app_with(TestOptions {
        clock: Some(clock.clone()),
        tweak: Some(Box::new(|s| s.dispatch.lease_secs = 100_000)),
        ..note_options(FakeConfig {
            window_secs: 3600,
            ..FakeConfig::default()
        })
    })
    .await;
    let first = post_note(&app, &order_note(1, 1)).await;
    app.wait_for_state(first, "delivered").await;
    // The Market refuses the next lookup with 420; its Until header names
    // the end of the chats/new window, an hour after the first lookup.
    app.market.script(ScriptedAnswer {
        status: 420,
        errors: vec![ApiErrorEntry {
            code: "HIT_RATE_LIMIT".into(),
            message: None,
        }],
        method: FakeMethod::CreateChat,
        ..ScriptedAnswer::default()
    });
    let second = post_note(&app, &order_note(2, 1)).await;
    wait_until("the second lookup is refused with 420", || {
        lookups(&app).iter().any(|r| r.status == 420)
    })
    .await;
    let paused = app.wait_for_state(second, "queued").await;
    assert_eq!(paused["attempts"][0]["outcome"], "throttled");

    // Sends to known chats go on meanwhile: a known chat and the first order's chat.
    let chat_note = post_note(
        &app,
        &json!({"id": "c-1", "type": "note.chat", "businessId": 111, "chatId": 31, "seq": 9}),
    )
    .await;
    let again = post_note(&app, &order_note(1, 2)).await;
    app.wait_for_state(chat_note, "delivered").await;
    app.wait_for_state(again, "delivered").await;
    assert_eq!(
        lookups(&app).len(),
        2,
        "no further chats/new call before the window ends"
    );
    assert_eq!(app.delivery(second).await["delivery"]["state"], "queued");

    // The window ends (the fake's Until); the lookup is made again and the message goes.
    clock.set(start + 3_600_000 + 1_000);
    let body = app.wait_for_state(second, "delivered").await;
    let calls = lookups(&app);
    assert_eq!(calls.len(), 3);
    assert!(
        calls[2].at >= start + 3_600_000,
        "asked again only after the window"
    );
    assert_eq!(body["delivery"]["chat_id"], calls[2].chat_id);
    app.stop().await;
}

#[actix_rt::test]
async fn lookups_and_sends_together_never_exceed_four_requests_in_flight() {
    let app = spawn_app_with(note_options(FakeConfig {
        latency_ms: 25,
        ..FakeConfig::default()
    }))
    .await;
    let events: Vec<Value> = (0..24)
        .map(|i| {
            if i % 2 == 0 {
                order_note(10_000 + i, i as usize)
            } else {
                json!({"id": format!("c-{i}"), "type": "note.chat", "businessId": 111, "chatId": 100 + i, "seq": i})
            }
        })
        .collect();
    futures_util::stream::iter(events.iter().map(|e| {
        let app = &app;
        async move { post_note(app, e).await }
    }))
    .buffer_unordered(24)
    .collect::<Vec<_>>()
    .await;
    let delivered = app.wait_for_delivered(24).await;
    assert_eq!(delivered.len(), 24);
    assert_eq!(lookups(&app).len(), 12);
    let stats = app.market.stats();
    assert!(
        stats.max_in_flight_seen[&111] <= 4,
        "saw {} in flight",
        stats.max_in_flight_seen[&111]
    );
    assert!(
        stats.max_in_flight_seen[&111] >= 2,
        "the test overlapped requests"
    );
    assert_eq!(
        stats.by_status.get(&420),
        None,
        "no 420 from the parallel cap"
    );
    app.stop().await;
}

/// Waits (real time, bounded) for a condition on what the fake Market saw.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
}
