//! The Market as a source: its push notifications, over real HTTP, at
//! `POST /hooks/market/notification`, answered per
//! `notifications.openapi.yaml`, turned into messages in the order's chat.

use chatbridge::market::fake::{FakeMethod, ScriptedAnswer};
use chatbridge::settings::Settings;
use serde_json::{json, Value};

use super::helpers::*;
use crate::spec::{load_spec, validate, Operation};

const CAMPAIGN: i64 = 21_000_001;
const BUSINESS: i64 = 111;

/// The shipped config, with the market source open to loopback and, when
/// `configured`, the sample campaign in `[market.campaigns]`.
fn market_options(
    configured: bool,
    extra: impl Fn(&mut Settings) + Send + Sync + 'static,
) -> TestOptions {
    TestOptions {
        tweak: Some(Box::new(move |s: &mut Settings| {
            if let Some(source) = s.sources.get_mut("market") {
                source.allow_from = vec!["127.0.0.1/32".into(), "::1/128".into()];
            }
            if configured {
                s.market.campaigns.insert(CAMPAIGN.to_string(), BUSINESS);
            }
            extra(s);
        })),
        ..TestOptions::default()
    }
}

async fn market_app(configured: bool) -> TestApp {
    spawn_app_with(market_options(configured, |_| {})).await
}

fn market_sample(name: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(format!("examples/events/market/{name}.json")))
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_success(status: u16, body: &Value) {
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "chatbridge", "{body}");
    assert!(
        body["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{body}"
    );
    assert!(
        body["time"]
            .as_str()
            .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
        "{body}"
    );
}

#[actix_rt::test]
async fn ping_is_answered_while_the_store_cannot_write() {
    let app = market_app(true).await;
    // Another connection holds the database's write lock (on PostgreSQL,
    // the events table's): the store cannot store anything until it goes.
    let db = app.raw_db().await;
    db.batch(
        "BEGIN IMMEDIATE",
        "BEGIN; LOCK TABLE events IN EXCLUSIVE MODE",
    )
    .await;

    let (status, body) = app
        .notify(&json!({"notificationType": "PING", "time": "2026-11-20T09:15:00.000Z"}))
        .await;

    assert_success(status, &body);
    db.batch("ROLLBACK", "ROLLBACK").await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_notification_becomes_one_message_in_the_orders_chat() {
    let app = market_app(true).await;

    let (status, body) = app.notify(&market_sample("order_in_delivery")).await;

    assert_success(status, &body);
    let sent = app.wait_for_delivered(1).await;
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0].business_id, BUSINESS);
    assert!(
        sent[0]
            .message
            .contains("№61234501 передан в службу доставки"),
        "{}",
        sent[0].message
    );
    let lookups = app.market.requests_of(FakeMethod::CreateChat);
    assert_eq!(lookups.len(), 1);
    assert_eq!(lookups[0].context, Some(("ORDER".into(), 61_234_501)));
    assert_eq!(
        sent[0].chat_id, lookups[0].chat_id,
        "the message went to the order's chat"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn the_same_status_again_sends_nothing_more_whatever_its_time() {
    let app = market_app(true).await;
    let first = market_sample("order_delivered");
    let mut later = first.clone();
    later["updatedAt"] = json!("2026-11-22T18:09:00.000Z");

    for body in [&first, &first, &later] {
        let (status, answer) = app.notify(body).await;
        assert_success(status, &answer);
    }
    app.caught_up().await;

    assert_eq!(app.buyer_messages().len(), 1, "{:#?}", app.buyer_messages());
    assert_eq!(app.market_deliveries().await.len(), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn an_older_status_after_a_newer_one_sends_nothing_and_says_why() {
    let app = market_app(true).await;
    let mut delivered = market_sample("order_delivered");
    delivered["orderId"] = json!(777);
    let mut in_delivery = market_sample("order_in_delivery");
    in_delivery["orderId"] = json!(777);
    in_delivery["updatedAt"] = json!("2026-11-21T09:15:00.000Z");

    let (status, body) = app.notify(&delivered).await;
    assert_success(status, &body);
    let (status, body) = app.notify(&in_delivery).await;
    assert_success(status, &body);
    app.caught_up().await;

    let messages = app.buyer_messages();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert!(
        messages[0].message.contains("получен"),
        "{}",
        messages[0].message
    );
    let deliveries = app.market_deliveries().await;
    let stale = deliveries
        .iter()
        .find(|d| d["route"] == "market-order-in-delivery")
        .expect("the older status is stored");
    assert_eq!(stale["state"], "cancelled", "{stale:#}");
    assert!(
        stale["reason"].as_str().unwrap().contains("stale"),
        "{stale:#}"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn unknown_types_and_statuses_are_stored_and_answered_200_without_deliveries() {
    let app = market_app(true).await;
    let new_type =
        json!({"notificationType": "ORDER_TELEPORTED", "orderId": 5, "campaignId": CAMPAIGN});
    let mut new_status = market_sample("order_in_delivery");
    new_status["status"] = json!("TELEPORTED");

    for body in [&new_type, &new_status] {
        let (status, answer) = app.notify(body).await;
        assert_success(status, &answer);
    }

    // Both stored: the status one under its repeat key.
    let (status, event) = app
        .admin_get("/admin/events?source=market&event_id=ORDER_STATUS_UPDATED%20orderId%3D61234501%20status%3DTELEPORTED%20substatus%3DDELIVERY_SERVICE_RECEIVED")
        .await;
    assert_eq!(status, 200, "{event}");
    let stored = app
        .raw_db()
        .await
        .count("SELECT COUNT(*) FROM events WHERE source = 'market' AND event_type = 'ORDER_TELEPORTED'")
        .await;
    assert_eq!(stored, 1);
    assert!(app.market_deliveries().await.is_empty());
    app.stop().await;
}

#[actix_rt::test]
async fn malformed_notifications_are_400_wrong_event_format() {
    let app = market_app(true).await;
    let mut no_order = market_sample("order_in_delivery");
    no_order.as_object_mut().unwrap().remove("orderId");
    let mut bad_time = market_sample("order_in_delivery");
    bad_time["updatedAt"] = json!("yesterday");
    let mut campaign_zero = market_sample("order_cancelled");
    campaign_zero["campaignId"] = json!(0);
    let mut no_items = market_sample("return_created");
    no_items.as_object_mut().unwrap().remove("items");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"{\"notificationType\": ".to_vec()),
        ("an array", b"[]".to_vec()),
        ("no notificationType", br#"{"orderId": 1}"#.to_vec()),
        (
            "notificationType a number",
            br#"{"notificationType": 5}"#.to_vec(),
        ),
        ("no orderId", no_order.to_string().into_bytes()),
        ("a time that is not one", bad_time.to_string().into_bytes()),
        ("campaignId 0", campaign_zero.to_string().into_bytes()),
        ("a return without items", no_items.to_string().into_bytes()),
    ];
    for (what, body) in cases {
        let (status, answer) = app.notify_raw(body, &[]).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(
            answer["error"]["type"], "WRONG_EVENT_FORMAT",
            "{what}: {answer}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    assert!(app.market_deliveries().await.is_empty());
    app.stop().await;
}

#[actix_rt::test]
async fn a_store_failure_answers_500_unknown_and_the_markets_retry_is_accepted() {
    let app = market_app(true).await;
    let db = app.raw_db().await;
    db.batch(
        "CREATE TRIGGER broken BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
        "CREATE FUNCTION broken() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$;
         CREATE TRIGGER broken BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION broken();",
    )
    .await;

    let (status, body) = app.notify(&market_sample("order_cancelled")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "UNKNOWN", "{body}");
    assert!(
        !body.to_string().contains("disk on fire"),
        "internals stay in the log: {body}"
    );

    db.batch("DROP TRIGGER broken", "DROP TRIGGER broken ON events")
        .await;
    let (status, body) = app.notify(&market_sample("order_cancelled")).await;
    assert_success(status, &body);
    assert_eq!(app.wait_for_delivered(1).await.len(), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn a_campaign_in_the_config_is_not_looked_up() {
    let app = market_app(true).await;
    let (status, body) = app.notify(&market_sample("order_at_pickup_point")).await;
    assert_success(status, &body);
    let sent = app.wait_for_delivered(1).await;
    assert_eq!(sent[0].business_id, BUSINESS);
    assert!(app.market.requests_of(FakeMethod::GetCampaign).is_empty());
    app.stop().await;
}

#[actix_rt::test]
async fn a_campaign_is_looked_up_through_the_api_once_ever() {
    let mut options = market_options(false, |_| {});
    options.fake.campaigns.insert("21000002".into(), 333);
    let app = spawn_app_with(options).await;
    let notification = |order: i64| {
        let mut n = market_sample("order_delivered");
        n["campaignId"] = json!(21_000_002);
        n["orderId"] = json!(order);
        n
    };

    // Several at once: still one call.
    let answers = futures_util::future::join_all((1..=4).map(|order| {
        let body = notification(order);
        let app = &app;
        async move { app.notify(&body).await }
    }))
    .await;
    for (status, body) in &answers {
        assert_success(*status, body);
    }
    let sent = app.wait_for_delivered(4).await;
    assert!(sent.iter().all(|m| m.business_id == 333), "{sent:#?}");
    assert_eq!(app.market.requests_of(FakeMethod::GetCampaign).len(), 1);

    // Remembered in the store: a restart does not ask again.
    let app = app.restart().await;
    let (status, body) = app.notify(&notification(5)).await;
    assert_success(status, &body);
    assert_eq!(app.wait_for_delivered(5).await.len(), 5);
    let calls = app.market.requests_of(FakeMethod::GetCampaign);
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].path_and_query, "/v2/campaigns/21000002");
    app.stop().await;
}

#[actix_rt::test]
async fn a_market_that_cannot_be_asked_answers_500_so_the_market_retries() {
    let mut options = market_options(false, |_| {});
    options
        .fake
        .campaigns
        .insert(CAMPAIGN.to_string(), BUSINESS);
    let app = spawn_app_with(options).await;
    app.market.script(ScriptedAnswer {
        method: FakeMethod::GetCampaign,
        status: 500,
        ..ScriptedAnswer::default()
    });

    let (status, body) = app.notify(&market_sample("order_delivered")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "UNKNOWN", "{body}");
    assert!(app.market_deliveries().await.is_empty(), "nothing stored");

    let (status, body) = app.notify(&market_sample("order_delivered")).await;
    assert_success(status, &body);
    assert_eq!(app.wait_for_delivered(1).await.len(), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn an_unknown_campaign_is_stored_and_its_deliveries_fail_saying_what_to_configure() {
    let app = market_app(false).await;
    let mut body = market_sample("order_delivered");
    body["campaignId"] = json!(29_999_999);

    let (status, answer) = app.notify(&body).await;

    assert_success(status, &answer);
    let deliveries = app.market_deliveries().await;
    assert_eq!(deliveries.len(), 1, "{deliveries:#?}");
    assert_eq!(deliveries[0]["state"], "failed");
    let reason = deliveries[0]["reason"].as_str().unwrap();
    assert!(reason.contains("does not exist"), "{reason}");
    assert!(
        reason.contains("\"29999999\" = <business id> under [market.campaigns]"),
        "{reason}"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn callers_outside_allow_from_are_refused_and_forwarded_addresses_count_only_behind_trusted_proxies(
) {
    let ping = json!({"notificationType": "PING"}).to_string().into_bytes();
    let via = |xff: &str| vec![("x-forwarded-for", xff.to_owned())];

    // No trusted proxy: the peer (loopback) is the caller, whatever it says.
    let app = spawn_app_with(market_options(false, |s| {
        s.sources.get_mut("market").unwrap().allow_from = vec!["10.1.2.0/24".into()];
    }))
    .await;
    let (status, body) = app.notify_raw(ping.clone(), &[]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["type"], "UNKNOWN", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allow_from"),
        "{body}"
    );
    let (status, body) = app.notify_raw(ping.clone(), &via("10.1.2.3")).await;
    assert_eq!(
        status, 403,
        "a header from an untrusted peer is not believed: {body}"
    );
    app.stop().await;

    // Behind a trusted proxy: the right-most hop that is not a trusted proxy.
    let app = spawn_app_with(market_options(false, |s| {
        s.sources.get_mut("market").unwrap().allow_from = vec!["10.1.2.0/24".into()];
        s.server.trusted_proxies = vec!["127.0.0.1".into(), "192.168.0.0/16".into()];
    }))
    .await;
    for (xff, expected) in [
        ("10.1.2.3", 200),
        ("10.1.2.3, 192.168.4.4", 200),
        ("10.1.2.3, 203.0.113.9", 403),
        ("203.0.113.9, 10.1.2.3", 200),
        ("", 403),
    ] {
        let (status, body) = app.notify_raw(ping.clone(), &via(xff)).await;
        assert_eq!(status, expected, "X-Forwarded-For {xff:?}: {body}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn the_wrong_path_for_a_source_answers_404_naming_the_right_one() {
    let app = market_app(true).await;
    let json = [("content-type", "application/json".to_owned())];
    let body = || market_sample("order_delivered").to_string().into_bytes();

    let (status, answer) = app.post_raw("/hooks/market", &json, body()).await;
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer.to_string().contains("/hooks/market/notification"),
        "{answer}"
    );
    let (status, answer) = app.post_raw("/hooks/oms/notification", &json, body()).await;
    assert_eq!(status, 404, "{answer}");
    assert!(answer.to_string().contains("/hooks/oms"), "{answer}");
    let (status, answer) = app
        .post_raw("/hooks/nope/notification", &json, body())
        .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = app
        .post_raw("/hooks/market/notification", &[], body())
        .await;
    assert_eq!(status, 415, "{answer}");
    assert_eq!(answer["error"]["type"], "WRONG_EVENT_FORMAT", "{answer}");
    app.stop().await;
}

#[actix_rt::test]
async fn the_fake_markets_notifier_pushes_repeats_and_reports_the_answers() {
    let app = market_app(true).await;
    let (status, report) = app
        .client
        .post(format!("{}/_fake/notify", app.market.base_url()))
        .send_json(&json!({
            "url": format!("{}/hooks/market", app.base),
            "notification": market_sample("order_cancelled"),
            "times": 2
        }))
        .await
        .map(|mut r| (r.status().as_u16(), r.body()))
        .expect("the fake answers");
    let report: Value = serde_json::from_slice(&report.await.unwrap()).unwrap();
    assert_eq!(status, 200, "{report}");
    let answers = report["answers"].as_array().unwrap();
    assert_eq!(answers.len(), 2);
    for a in answers {
        assert_eq!(a["status"], 200, "{report}");
        assert_eq!(a["body"]["name"], "chatbridge", "{report}");
    }
    app.caught_up().await;
    assert_eq!(app.buyer_messages().len(), 1, "a repeat sends nothing more");
    app.stop().await;
}

#[actix_rt::test]
async fn every_request_a_notification_causes_matches_the_markets_openapi_description() {
    let chats = load_spec("chats.openapi.yaml");
    let campaigns = load_spec("campaigns.openapi.yaml");
    let mut options = market_options(false, |_| {});
    options
        .fake
        .campaigns
        .insert(CAMPAIGN.to_string(), BUSINESS);
    let app = spawn_app_with(options).await;

    let (status, body) = app.notify(&market_sample("return_created")).await;
    assert_success(status, &body);
    app.wait_for_delivered(1).await;

    let requests = app.market.requests();
    assert_eq!(
        requests.len(),
        3,
        "getCampaign, createChat, send: {requests:#?}"
    );
    let mut problems = Vec::new();
    for r in &requests {
        let operation = match r.method {
            FakeMethod::GetCampaign => {
                Operation::from_spec(&campaigns, "get", "/v2/campaigns/{campaignId}")
            }
            FakeMethod::CreateChat => {
                Operation::from_spec(&chats, "post", "/v2/businesses/{businessId}/chats/new")
            }
            FakeMethod::SendMessage => {
                Operation::from_spec(&chats, "post", "/v2/businesses/{businessId}/chats/message")
            }
            other => panic!("chatbridge does not call {other:?}"),
        };
        problems.extend(
            operation
                .problems(r)
                .into_iter()
                .map(|p| format!("{}: {p}", r.path_and_query)),
        );
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("x-market-integration")
                    && v.starts_with("chatbridge/")),
            "{r:#?}"
        );
    }
    assert!(
        problems.is_empty(),
        "requests the Market would refuse:\n{}",
        problems.join("\n")
    );
    app.stop().await;
}

#[test]
fn every_shipped_sample_notification_matches_the_notification_spec() {
    let spec = load_spec("notifications.openapi.yaml");
    let schema = json!({"$ref": "#/components/schemas/SendNotificationRequest"});
    let dir = repo().join("examples/events/market");
    let mut checked = 0;
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        let mut found = Vec::new();
        validate(&spec, &schema, &value, "notification", &mut found);
        problems.extend(
            found
                .into_iter()
                .map(|p| format!("{}: {p}", entry.path().display())),
        );
        checked += 1;
    }
    assert!(checked >= 6, "the samples are in {}", dir.display());
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The check itself catches what the Market would never send.
    let mut found = Vec::new();
    validate(
        &spec,
        &schema,
        &json!({"notificationType": "ORDER_STATUS_UPDATED", "orderId": 1, "campaignId": 0, "status": "DELIVERY", "updatedAt": "x"}),
        "bad",
        &mut found,
    );
    assert!(found.iter().any(|p| p.contains("substatus")), "{found:?}");
    assert!(found.iter().any(|p| p.contains("minimum")), "{found:?}");
    let mut found = Vec::new();
    validate(
        &spec,
        &schema,
        &json!({"notificationType": "ORDER_CANCELLED", "orderId": 1, "campaignId": 1, "cancelledAt": "2026-01-01T00:00:00Z", "items": [{"offerId": " ", "count": 1}]}),
        "bad",
        &mut found,
    );
    assert!(found.iter().any(|p| p.contains("pattern")), "{found:?}");
}
