//! What each Market answer does to a delivery: retries with backoff, dead
//! letters with the API's codes, held keys, 420 windows, and a restart that
//! loses nothing. Time runs on a manual clock; no test sleeps through a
//! backoff.

use std::sync::Arc;
use std::time::Duration;

use chatbridge::clock::{Clock, ManualClock};
use chatbridge::market::fake::ScriptedAnswer;
use chatbridge::store::ApiErrorEntry;
use serde_json::{json, Value};

use super::helpers::*;

const START: i64 = 1_795_000_000_000;

fn manual_clock() -> (TestOptions, Arc<ManualClock>) {
    let clock = ManualClock::new(START);
    let options = TestOptions {
        clock: Some(clock.clone()),
        ..TestOptions::default()
    };
    (options, clock)
}

fn answer(status: u16, errors: &[(&str, &str)]) -> ScriptedAnswer {
    ScriptedAnswer {
        status,
        errors: errors
            .iter()
            .map(|(code, message)| ApiErrorEntry {
                code: (*code).into(),
                message: Some((*message).into()),
            })
            .collect(),
        business_id: None,
        chat_id: None,
        times: 1,
        ..Default::default()
    }
}

fn ms(rfc3339: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339.as_str().expect("a time"))
        .expect("an RFC 3339 time")
        .timestamp_millis()
}

fn attempts(view: &Value) -> &Vec<Value> {
    view["attempts"].as_array().expect("attempts")
}

fn has_attempts(n: usize) -> impl Fn(&Value) -> bool {
    move |view| attempts(view).len() == n && view["delivery"]["state"] != "sending"
}

async fn post(app: &TestApp, event: &Value) -> i64 {
    let (status, body) = app.post_event("oms", event).await;
    assert_eq!(status, 202, "{body}");
    body["deliveries"][0]["id"].as_i64().unwrap()
}

/// Waits until the dispatcher has run rounds on the clock as it is now (a
/// positive signal, see `caught_up`), to show that nothing happens before
/// its time.
async fn settle(app: &TestApp) {
    app.caught_up().await;
}

#[actix_rt::test]
async fn a_500_is_retried_after_the_backoff_and_both_attempts_are_recorded() {
    let (options, clock) = manual_clock();
    let app = spawn_app_with(options).await;
    app.market
        .script(answer(500, &[("INTERNAL_ERROR", "try again later")]));

    let id = post(&app, &sample("order_shipped")).await;
    let first = app
        .wait_for_delivery(id, "a first attempt", has_attempts(1))
        .await;

    assert_eq!(first["delivery"]["state"], "queued", "{first:#}");
    let failed = &attempts(&first)[0];
    assert_eq!(failed["http_status"], 500);
    assert_eq!(failed["outcome"], "retry");
    assert_eq!(failed["api_errors"][0]["code"], "INTERNAL_ERROR");
    let retry_at = ms(&first["delivery"]["next_attempt_at"]) - clock.now_ms();
    assert!(
        (2_500..=5_000).contains(&retry_at),
        "the first retry waits 2.5-5 s (initial_backoff_secs = 5 with jitter), not {retry_at} ms"
    );

    app.advance(Duration::from_millis(2_400));
    settle(&app).await;
    assert_eq!(app.buyer_requests().len(), 1, "retried before its backoff");

    app.advance(Duration::from_millis(2_600));
    let done = app.wait_for_state(id, "delivered").await;

    let recorded: Vec<(Value, Value)> = attempts(&done)
        .iter()
        .map(|a| (a["http_status"].clone(), a["outcome"].clone()))
        .collect();
    assert_eq!(
        recorded,
        [
            (json!(500), json!("retry")),
            (json!(200), json!("delivered"))
        ]
    );
    assert_eq!(done["delivery"]["attempts"], 2);
    assert_eq!(app.buyer_messages().len(), 1);
    assert_eq!(app.buyer_requests().len(), 2);
    app.stop().await;
}

#[actix_rt::test]
async fn a_400_makes_the_delivery_dead_with_the_markets_code_and_message() {
    let (options, _clock) = manual_clock();
    let app = spawn_app_with(options).await;
    app.market
        .script(answer(400, &[("CHAT_NOT_FOUND", "Чат 5001 не найден")]));

    let id = post(&app, &sample("order_shipped")).await;
    let dead = app.wait_for_state(id, "dead").await;

    let tried = attempts(&dead);
    assert_eq!(tried.len(), 1, "dead at once, not retried: {dead:#}");
    assert_eq!(tried[0]["http_status"], 400);
    assert_eq!(tried[0]["outcome"], "dead");
    assert_eq!(
        tried[0]["api_errors"],
        json!([{"code": "CHAT_NOT_FOUND", "message": "Чат 5001 не найден"}])
    );
    let reason = dead["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("CHAT_NOT_FOUND") && reason.contains("Чат 5001 не найден"),
        "the reason an operator reads: {reason}"
    );
    let (status, listed) = app.admin_get("/admin/deliveries?state=dead").await;
    assert_eq!(status, 200);
    assert_eq!(listed["deliveries"][0]["id"], id, "{listed}");
    app.advance(Duration::from_secs(3_600));
    settle(&app).await;
    assert_eq!(
        app.buyer_requests().len(),
        1,
        "a dead delivery is never retried by itself"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_redirect_is_not_followed_so_the_key_goes_nowhere_else_and_the_delivery_is_dead() {
    // An address that answers every call with 307 to another of its paths,
    // which would answer 200: followed, the message and the seller's
    // Api-Key would go there and the delivery would count as delivered.
    use actix_web::{web, App, HttpResponse, HttpServer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let followed = Arc::new(AtomicUsize::new(0));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = followed.clone();
    let server = HttpServer::new(move || {
        let counter = counter.clone();
        App::new()
            .route(
                "/elsewhere",
                web::to(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async { HttpResponse::Ok().json(json!({"status": "OK"})) }
                }),
            )
            .default_service(web::to(move || async move {
                HttpResponse::TemporaryRedirect()
                    .insert_header(("Location", format!("http://{addr}/elsewhere")))
                    .finish()
            }))
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    let server_handle = server.handle();
    actix_rt::spawn(server);
    let (mut options, _clock) = manual_clock();
    options.tweak = Some(Box::new(move |s| {
        s.market.base_url = format!("http://{addr}");
    }));
    let app = spawn_app_with(options).await;

    let id = post(&app, &sample("order_shipped")).await;
    let dead = app.wait_for_state(id, "dead").await;

    assert_eq!(attempts(&dead)[0]["http_status"], 307, "{dead:#}");
    let reason = dead["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("307"),
        "the reason names the status: {reason}"
    );
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    app.stop().await;
    server_handle.stop(true).await;
}

#[actix_rt::test]
async fn a_404_without_error_codes_is_dead_and_names_the_status() {
    let (options, _clock) = manual_clock();
    let app = spawn_app_with(options).await;
    app.market.script(answer(404, &[]));

    let id = post(&app, &sample("order_shipped")).await;
    let dead = app.wait_for_state(id, "dead").await;

    assert_eq!(attempts(&dead)[0]["http_status"], 404);
    assert_eq!(attempts(&dead)[0]["api_errors"], json!([]));
    let reason = dead["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("404"), "{reason}");
    app.stop().await;
}

#[actix_rt::test]
async fn a_401_holds_the_business_until_its_key_works_again() {
    let (options, _clock) = manual_clock();
    let app = spawn_app_with(options).await;
    app.market
        .script(answer(401, &[("UNAUTHORIZED", "Api-Key is invalid")]));

    let first = post(&app, &sample("order_shipped")).await;
    let held = app.wait_for_state(first, "held").await;

    assert_eq!(attempts(&held).len(), 1);
    assert_eq!(attempts(&held)[0]["http_status"], 401);
    assert_eq!(attempts(&held)[0]["outcome"], "held");
    assert_eq!(attempts(&held)[0]["api_errors"][0]["code"], "UNAUTHORIZED");
    assert!(held["delivery"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("401")));
    // Another message of the same business waits too.
    let second = post(&app, &sample("order_delivered")).await;
    settle(&app).await;
    assert_eq!(
        app.buyer_requests().len(),
        1,
        "nothing is sent while the key is refused"
    );
    assert_ne!(app.delivery(second).await["delivery"]["state"], "dead");

    // The key works again (the script is used up); the slow probe finds out.
    app.advance(Duration::from_secs(301));
    app.wait_for_state(first, "delivered").await;
    app.wait_for_state(second, "delivered").await;
    assert_eq!(app.buyer_messages().len(), 2);
    app.stop().await;
}

#[actix_rt::test]
async fn a_403_on_one_chat_is_dead_but_on_a_second_chat_holds_the_business() {
    let (options, _clock) = manual_clock();
    let app = spawn_app_with(options).await;
    app.market.script(ScriptedAnswer {
        chat_id: Some(5001),
        ..answer(403, &[("FORBIDDEN", "no access to this chat")])
    });
    app.market.script(ScriptedAnswer {
        chat_id: Some(5002),
        ..answer(403, &[("FORBIDDEN", "no access")])
    });

    let one = post(&app, &sample("order_shipped")).await;
    app.wait_for_state(one, "dead").await;
    let two = post(&app, &sample("order_delivered")).await;

    app.wait_for_state(two, "held").await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_420_is_not_an_attempt_and_the_message_goes_when_the_window_passes() {
    let (options, clock) = manual_clock();
    let app = spawn_app_with(options).await;
    app.market
        .script(answer(420, &[("HIT_RATE_LIMIT", "too many requests")]));

    let id = post(&app, &sample("order_shipped")).await;
    let throttled = app
        .wait_for_delivery(id, "the 420 recorded", has_attempts(1))
        .await;

    assert_eq!(throttled["delivery"]["state"], "queued", "{throttled:#}");
    assert_eq!(
        throttled["delivery"]["attempts"], 0,
        "a 420 is not an attempt"
    );
    assert_eq!(attempts(&throttled)[0]["http_status"], 420);
    assert_eq!(attempts(&throttled)[0]["outcome"], "throttled");
    // The fake's window ends an hour from now (X-RateLimit-Resource-Until,
    // whole seconds, so surely over a second after the named one); the
    // delivery waits for it, not for a retry backoff.
    let wait = ms(&throttled["delivery"]["next_attempt_at"]) - clock.now_ms();
    assert!((3_600_001..=3_601_000).contains(&wait), "waits {wait} ms");
    app.advance(Duration::from_secs(60));
    settle(&app).await;
    assert_eq!(
        app.buyer_requests().len(),
        1,
        "sent again inside the Market's window"
    );

    app.advance(Duration::from_secs(3_541));
    let done = app.wait_for_state(id, "delivered").await;

    assert_eq!(
        done["delivery"]["attempts"], 1,
        "only the send that went through counts"
    );
    assert_eq!(app.buyer_messages().len(), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn a_restart_loses_no_queued_delivery_and_sends_each_once_in_chat_order() {
    let (options, _clock) = manual_clock();
    let app = spawn_app_with(options).await;
    app.market.configure(|c| c.failure_rate = 1.0);
    // Two events for each of four chats.
    let mut expected: Vec<(i64, i64)> = Vec::new();
    let mut ids = Vec::new();
    for n in 0..8i64 {
        let chat = 7001 + n % 4;
        let order = 60_000 + n;
        let mut event = sample("order_shipped");
        event["id"] = json!(format!("restart-{n}"));
        event["chatId"] = json!(chat);
        event["orderId"] = json!(order);
        ids.push(post(&app, &event).await);
        expected.push((chat, order));
    }
    // The first of each chat has failed once; the rest wait behind it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.buyer_requests().len() < 4
        || app
            .all_deliveries()
            .await
            .iter()
            .any(|d| d["state"] == "sending")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{:#?}",
            app.all_deliveries().await
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(app.buyer_messages().is_empty());

    let app = app.restart().await;
    app.market.configure(|c| c.failure_rate = 0.0);
    app.advance(Duration::from_secs(6));

    for id in &ids {
        app.wait_for_state(*id, "delivered").await;
    }
    let delivered = app.buyer_messages();
    assert_eq!(delivered.len(), 8, "each exactly once: {delivered:#?}");
    for chat in 7001..=7004 {
        let got: Vec<String> = delivered
            .iter()
            .filter(|r| r.chat_id == chat)
            .map(|r| r.message.clone())
            .collect();
        let orders: Vec<i64> = expected
            .iter()
            .filter(|(c, _)| *c == chat)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(got.len(), 2, "chat {chat}: {got:#?}");
        for (message, order) in got.iter().zip(&orders) {
            assert!(
                message.contains(&format!("№{order} ")),
                "chat {chat} out of order: {got:#?}"
            );
        }
    }
    app.stop().await;
}

#[actix_rt::test]
async fn an_operator_can_send_a_dead_delivery_again() {
    let (options, _clock) = manual_clock();
    let app = spawn_app_with(options).await;
    app.market
        .script(answer(400, &[("CHAT_NOT_FOUND", "chat not found")]));
    let id = post(&app, &sample("order_shipped")).await;
    app.wait_for_state(id, "dead").await;

    let (status, body) = app
        .admin_post(&format!("/admin/deliveries/{id}/retry"), &json!({}))
        .await;

    assert_eq!(status, 200, "{body}");
    let done = app.wait_for_state(id, "delivered").await;
    assert_eq!(attempts(&done).len(), 2);
    assert_eq!(app.buyer_messages().len(), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn a_delivery_that_keeps_failing_is_dead_after_its_maximum_age() {
    let clock = ManualClock::new(START);
    let app = spawn_app_with(TestOptions {
        clock: Some(clock.clone()),
        tweak: Some(Box::new(|s| s.dispatch.max_age_secs = 60)),
        ..TestOptions::default()
    })
    .await;
    app.market.configure(|c| c.failure_rate = 1.0);
    let id = post(&app, &sample("order_shipped")).await;

    let mut view = app
        .wait_for_delivery(id, "a first attempt", has_attempts(1))
        .await;
    for _ in 0..40 {
        if view["delivery"]["state"] == "dead" {
            break;
        }
        let tried = attempts(&view).len();
        app.advance(Duration::from_secs(5));
        // Either another attempt, or nothing due yet.
        settle_on(&app, id, tried).await;
        view = app.delivery(id).await;
    }

    assert_eq!(view["delivery"]["state"], "dead", "{view:#}");
    let tried = attempts(&view);
    assert!(tried.len() >= 3, "retried with backoff first: {view:#}");
    assert!(tried.iter().all(|a| a["http_status"] == 500));
    assert_eq!(tried.last().unwrap()["outcome"], "dead");
    let last = ms(&tried.last().unwrap()["at"]);
    assert!(
        last - START <= 60_000,
        "no attempt after the maximum age: {view:#}"
    );
    let reason = view["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("500"), "{reason}");
    assert!(app.buyer_messages().is_empty());
    app.stop().await;
}

/// Waits briefly for the delivery to get past `tried` attempts; fine if it does not.
async fn settle_on(app: &TestApp, id: i64, tried: usize) {
    for _ in 0..10 {
        let view = app.delivery(id).await;
        if attempts(&view).len() > tried && view["delivery"]["state"] != "sending" {
            return;
        }
        actix_rt::time::sleep(Duration::from_millis(15)).await;
    }
}

#[actix_rt::test]
async fn a_cancelled_delivery_is_never_sent() {
    let (options, _clock) = manual_clock();
    let app = spawn_app_with(options).await;
    app.market.script(answer(503, &[]));
    let id = post(&app, &sample("order_shipped")).await;
    app.wait_for_delivery(id, "a first attempt", has_attempts(1))
        .await;

    let (status, body) = app
        .admin_post(&format!("/admin/deliveries/{id}/cancel"), &json!({}))
        .await;

    assert_eq!(status, 200, "{body}");
    app.advance(Duration::from_secs(3_600));
    settle(&app).await;
    let view = app.delivery(id).await;
    assert_eq!(view["delivery"]["state"], "cancelled", "{view:#}");
    assert_eq!(attempts(&view).len(), 1);
    assert!(app.buyer_messages().is_empty());
    app.stop().await;
}

/// A fake Market allowing one send per 10 s window, on a clock 300 ms past
/// a whole second, so its windows end mid-second while its
/// `X-RateLimit-Resource-Until` names the whole second before.
fn one_send_per_ten_seconds() -> (TestOptions, Arc<ManualClock>) {
    let (mut options, _) = manual_clock();
    let clock = ManualClock::new(START + 300);
    options.clock = Some(clock.clone());
    options.fake.hourly_limit = 1;
    options.fake.window_secs = 10;
    (options, clock)
}

/// Waits (real time, bounded) until the dispatcher sleeps on the clock
/// until some time at or after `from`, and returns that time.
async fn dispatcher_sleeps_until(clock: &ManualClock, from: i64) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(at) = clock.next_deadline().filter(|&at| at >= from) {
            return at;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dispatcher never waited for the window"
        );
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix_rt::test]
async fn a_used_up_window_is_waited_out_past_its_named_second_and_never_sent_into_early() {
    let (options, clock) = one_send_per_ten_seconds();
    let app = spawn_app_with(options).await;
    let first = post(&app, &sample_as("order_shipped", "w-1", None)).await;
    app.wait_for_state(first, "delivered").await;
    // The window opened at +0.3 s and ends at +10.3 s; the header says +10 s.

    let second = post(&app, &sample_as("order_shipped", "w-2", Some(5002))).await;
    let wakes_at = dispatcher_sleeps_until(&clock, START + 10_000).await;

    assert_eq!(
        wakes_at,
        START + 11_000,
        "waits until the named second is over, not until it starts"
    );
    clock.set(START + 11_000);
    app.wait_for_state(second, "delivered").await;
    let statuses: Vec<u16> = app.market.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200], "no send into the old window");
    app.stop().await;
}

#[actix_rt::test]
async fn a_420_naming_a_second_already_behind_us_waits_a_second_not_the_long_backoff() {
    let (mut options, clock) = one_send_per_ten_seconds();
    // The first send leaves room (Remaining: 1), so nothing pauses; then
    // the Market's limit drops to one. At +10.1 s the window the first send
    // opened (until +10.3 s) is full, and the 420 names +10 s: already
    // behind us. (A restart no longer forgets a pause: it is stored.)
    options.fake.hourly_limit = 2;
    let app = spawn_app_with(options).await;
    let first = post(&app, &sample_as("order_shipped", "p-1", None)).await;
    app.wait_for_state(first, "delivered").await;
    app.market.configure(|c| c.hourly_limit = 1);
    clock.set(START + 10_100);

    let second = post(&app, &sample_as("order_shipped", "p-2", Some(5002))).await;
    let throttled = app
        .wait_for_delivery(second, "the 420 recorded", has_attempts(1))
        .await;

    assert_eq!(attempts(&throttled)[0]["http_status"], 420, "{throttled:#}");
    assert_eq!(
        ms(&throttled["delivery"]["next_attempt_at"]),
        START + 11_000,
        "a short wait past the named second, not throttle_backoff_secs: {throttled:#}"
    );
    clock.set(START + 11_000);
    app.wait_for_state(second, "delivered").await;
    app.stop().await;
}
