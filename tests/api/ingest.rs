//! `POST /hooks/{source}`: each refusal has its status and JSON error and
//! stores nothing; duplicates create nothing; routing honours sources and
//! `continue`.

use actix_web::web::Bytes;
use serde_json::{json, Value};

use super::helpers::*;

/// Asserts a refusal: the status and `{"error":{"code","message"}}`.
fn assert_error(status: u16, body: &Value, want_status: u16, want_code: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let code = body["error"]["code"].as_str();
    let message = body["error"]["message"].as_str();
    assert!(
        code.is_some_and(|c| !c.is_empty()) && message.is_some_and(|m| !m.is_empty()),
        "errors are {{\"error\":{{\"code\",\"message\"}}}}: {body}"
    );
    if let Some(want) = want_code {
        assert_eq!(code, Some(want), "{body}");
    }
}

/// Nothing stored (no delivery, not even an event without one: a fresh
/// database gives its first event id 1) and nothing sent.
async fn assert_nothing_stored_or_sent(app: &TestApp) {
    assert_eq!(app.all_deliveries().await, Vec::<Value>::new());
    let (status, body) = app.admin_get("/admin/events/1").await;
    assert_eq!(status, 404, "an event was stored: {body}");
    assert!(
        app.market.requests().is_empty(),
        "{:#?}",
        app.market.requests()
    );
}

/// (id, route) of each delivery in an ingest answer; states move on, these do not.
fn delivery_ids(answer: &Value) -> Vec<(i64, String)> {
    answer["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| {
            (
                d["id"].as_i64().unwrap(),
                d["route"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The request body as a chunked stream (no Content-Length).
async fn post_chunked(
    app: &TestApp,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, Value) {
    let mut req = app.client.post(format!("{}{path}", app.base));
    for (k, v) in headers {
        req = req.insert_header((*k, v.as_str()));
    }
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(256)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let mut resp = req
        .send_stream(futures_util::stream::iter(chunks))
        .await
        .expect("request failed");
    let status = resp.status().as_u16();
    let bytes = resp.body().limit(1 << 20).await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[actix_rt::test]
async fn an_unknown_source_is_404_unknown_source() {
    let app = spawn_app().await;

    let (status, body) = app.post_event("nosuch", &sample("order_shipped")).await;

    assert_error(status, &body, 404, Some("unknown_source"));
    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_body_over_max_body_bytes_is_413_body_too_large() {
    let app = spawn_app_with(TestOptions {
        tweak: Some(Box::new(|s| s.server.max_body_bytes = 1024)),
        ..TestOptions::default()
    })
    .await;
    let mut event = sample("order_shipped");
    event["padding"] = json!("x".repeat(1100));
    let text = event.to_string().into_bytes();
    assert!(text.len() > 1024);

    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &signed_headers(&text, now_secs(&app)),
            text.clone(),
        )
        .await;
    assert_error(status, &body, 413, Some("body_too_large"));
    let (status, body) = post_chunked(
        &app,
        "/hooks/oms",
        &signed_headers(&text, now_secs(&app)),
        text,
    )
    .await;
    assert_error(status, &body, 413, Some("body_too_large"));

    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_body_of_exactly_max_body_bytes_is_accepted() {
    let app = spawn_app_with(TestOptions {
        tweak: Some(Box::new(|s| s.server.max_body_bytes = 1024)),
        ..TestOptions::default()
    })
    .await;
    let mut event = sample("order_shipped");
    event["padding"] = json!("");
    let short = event.to_string().len();
    event["padding"] = json!("x".repeat(1024 - short));
    let text = event.to_string().into_bytes();
    assert_eq!(text.len(), 1024);

    let (status, body) = app
        .post_raw("/hooks/oms", &signed_headers(&text, now_secs(&app)), text)
        .await;

    assert_eq!(status, 202, "{body}");
    app.stop().await;
}

#[actix_rt::test]
async fn a_missing_or_wrong_content_type_is_415() {
    let app = spawn_app().await;
    let text = sample("order_shipped").to_string().into_bytes();

    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut headers = signed_headers(&text, now_secs(&app));
        headers.retain(|(k, _)| *k != "content-type");
        if let Some(ct) = content_type {
            headers.push(("content-type", ct.into()));
        }
        let (status, body) = app.post_raw("/hooks/oms", &headers, text.clone()).await;
        assert_error(status, &body, 415, None);
    }

    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn json_with_a_charset_is_accepted() {
    let app = spawn_app().await;
    let text = sample("order_shipped").to_string().into_bytes();
    let mut headers = signed_headers(&text, now_secs(&app));
    headers[0].1 = "application/json; charset=utf-8".into();

    let (status, body) = app.post_raw("/hooks/oms", &headers, text).await;

    assert_eq!(status, 202, "{body}");
    app.stop().await;
}

#[actix_rt::test]
async fn a_bad_signature_is_401_unauthorized() {
    let app = spawn_app().await;
    let text = sample("order_shipped").to_string().into_bytes();

    // Signed for another body.
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &signed_headers(b"{}", now_secs(&app)),
            text.clone(),
        )
        .await;
    assert_error(status, &body, 401, Some("unauthorized"));
    // Signed with another secret.
    let mut headers = signed_headers(&text, now_secs(&app));
    headers[3].1 = chatbridge::ingest::signature::sign(
        "whsec_c29tZSBvdGhlciBzZWNyZXQ=",
        &headers[1].1,
        now_secs(&app),
        &text,
    )
    .unwrap();
    let (status, body) = app.post_raw("/hooks/oms", &headers, text.clone()).await;
    assert_error(status, &body, 401, Some("unauthorized"));
    // Garbage.
    let mut headers = signed_headers(&text, now_secs(&app));
    headers[3].1 = "v1,bm90IGEgc2lnbmF0dXJl".into();
    let (status, body) = app.post_raw("/hooks/oms", &headers, text).await;
    assert_error(status, &body, 401, Some("unauthorized"));

    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_correctly_signed_but_stale_or_future_timestamp_is_401() {
    let app = spawn_app().await;
    let text = sample("order_shipped").to_string().into_bytes();

    for offset in [-600, 600] {
        let headers = signed_headers(&text, now_secs(&app) + offset);
        let (status, body) = app.post_raw("/hooks/oms", &headers, text.clone()).await;
        assert_error(status, &body, 401, Some("unauthorized"));
    }

    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn missing_signature_headers_are_401() {
    let app = spawn_app().await;
    let text = sample("order_shipped").to_string().into_bytes();

    for missing in [
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "all",
    ] {
        let mut headers = signed_headers(&text, now_secs(&app));
        headers.retain(|(k, _)| *k == "content-type" || (missing != "all" && *k != missing));
        let (status, body) = app.post_raw("/hooks/oms", &headers, text.clone()).await;
        assert_error(status, &body, 401, Some("unauthorized"));
    }

    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn correctly_signed_invalid_json_is_400_invalid_json() {
    let app = spawn_app().await;

    for text in [&b"{\"type\": \"order.shipped\","[..], b"not json", b""] {
        let headers = signed_headers(text, now_secs(&app));
        let (status, body) = app.post_raw("/hooks/oms", &headers, text.to_vec()).await;
        assert_error(status, &body, 400, Some("invalid_json"));
    }

    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn an_event_without_a_type_is_400_missing_event_type() {
    let app = spawn_app().await;

    for event in [
        json!({"id": "t-1", "businessId": 111, "chatId": 1}),
        json!({"id": "t-2", "type": "", "businessId": 111, "chatId": 1}),
        json!({"id": "t-3", "type": 7, "businessId": 111, "chatId": 1}),
    ] {
        let (status, body) = app.post_event("oms", &event).await;
        assert_error(status, &body, 400, Some("missing_event_type"));
    }

    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn checks_run_in_the_documented_order() {
    let app = spawn_app_with(TestOptions {
        tweak: Some(Box::new(|s| s.server.max_body_bytes = 1024)),
        ..TestOptions::default()
    })
    .await;
    let big = vec![b'x'; 2000];
    let plain = |extra: &[(&'static str, String)]| {
        let mut h = vec![("content-type", "text/plain".to_string())];
        h.extend_from_slice(extra);
        h
    };
    let bad_sig = vec![
        ("webhook-id", "msg_x".to_string()),
        ("webhook-timestamp", now_secs(&app).to_string()),
        ("webhook-signature", "v1,AAAA".to_string()),
    ];

    // Unknown source beats everything else.
    let (status, body) = app
        .post_raw("/hooks/nosuch", &plain(&[]), big.clone())
        .await;
    assert_error(status, &body, 404, Some("unknown_source"));
    // Too large beats a wrong content type and a bad signature.
    let (status, body) = app
        .post_raw("/hooks/oms", &plain(&bad_sig), big.clone())
        .await;
    assert_error(status, &body, 413, Some("body_too_large"));
    // A wrong content type beats a bad signature.
    let (status, body) = app
        .post_raw("/hooks/oms", &plain(&bad_sig), b"{}".to_vec())
        .await;
    assert_error(status, &body, 415, None);
    // A bad signature beats invalid JSON.
    let mut json_bad_sig = bad_sig.clone();
    json_bad_sig.push(("content-type", "application/json".into()));
    let (status, body) = app
        .post_raw("/hooks/oms", &json_bad_sig, b"not json".to_vec())
        .await;
    assert_error(status, &body, 401, Some("unauthorized"));

    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_chunked_body_over_the_limit_is_413_before_the_content_type_is_judged() {
    let app = spawn_app_with(TestOptions {
        tweak: Some(Box::new(|s| s.server.max_body_bytes = 1024)),
        ..TestOptions::default()
    })
    .await;

    let (status, body) = post_chunked(
        &app,
        "/hooks/oms",
        &[("content-type", "text/plain".into())],
        vec![b'x'; 2000],
    )
    .await;

    assert_error(status, &body, 413, Some("body_too_large"));
    app.stop().await;
}

#[actix_rt::test]
async fn a_repeated_event_answers_200_duplicate_and_reaches_the_buyer_once() {
    let app = spawn_app().await;
    let event = sample("order_shipped");

    let (first_status, first) = app.post_event("oms", &event).await;
    let (second_status, second) = app.post_event("oms", &event).await;

    assert_eq!(first_status, 202, "{first}");
    assert_eq!(first.get("duplicate"), None, "{first}");
    assert_eq!(second_status, 200, "{second}");
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(second["event_id"], first["event_id"]);
    assert_eq!(first["event_id"], "evt-1001");
    assert_eq!(delivery_ids(&second), delivery_ids(&first));
    assert_eq!(delivery_ids(&first).len(), 1);
    app.wait_for_state(delivery_ids(&first)[0].0, "delivered")
        .await;
    // A third copy after delivery is still a duplicate.
    let (third_status, third) = app.post_event("oms", &event).await;
    assert_eq!(third_status, 200, "{third}");
    assert_eq!(delivery_ids(&third), delivery_ids(&first));
    assert_eq!(app.all_deliveries().await.len(), 1);
    assert_eq!(
        app.market.requests().len(),
        1,
        "{:#?}",
        app.market.requests()
    );
    app.stop().await;
}

#[actix_rt::test]
async fn an_event_no_route_matches_is_stored_and_answered_202_with_no_deliveries() {
    let app = spawn_app().await;
    let event =
        json!({"id": "nr-1", "type": "order.returned.to.sender", "businessId": 111, "chatId": 1});

    let (status, body) = app.post_event("oms", &event).await;

    assert_eq!(status, 202, "{body}");
    assert_eq!(body["deliveries"], json!([]), "{body}");
    assert_eq!(body["event_id"], "nr-1");
    // The first event of a fresh database.
    let (status, stored) = app.admin_get("/admin/events/1").await;
    assert_eq!(status, 200, "the event is stored: {stored}");
    assert_eq!(stored["event_id"], "nr-1");
    assert_eq!(stored["payload"], event);
    let (status, again) = app.post_event("oms", &event).await;
    assert_eq!(status, 200, "a stored event is a duplicate: {again}");
    assert_eq!(app.all_deliveries().await, Vec::<Value>::new());
    app.stop().await;
}

/// A second source `crm` (same secret) with its own route for the same
/// event type, and a `continue = true` route before the shipped ones.
fn two_sources_options() -> TestOptions {
    let files = vec![
        shipped_settings_plus(&format!(
            "[sources.crm]\nsecret = \"{SECRET}\"\nevent_type = \"/type\"\nevent_id = \"/id\"\n"
        )),
        (
            "config/routes.toml".into(),
            format!(
                r#"
[[routes]]
name = "courier-note"
event = "order.*"
when = {{ "delivery.type" = "COURIER" }}
template = "courier_note"
business_id = "{{{{businessId}}}}"
chat_id = "{{{{chatId}}}}"
continue = true

[[routes]]
name = "crm-shipped"
source = "crm"
event = "order.shipped"
template = "crm_shipped"
business_id = 333
chat_id = "{{{{chatId}}}}"

{}"#,
                std::fs::read_to_string(repo().join("config/routes.toml")).unwrap()
            ),
        ),
        (
            "templates/courier_note.hbs".into(),
            "Курьер привезёт заказ №{{orderId}}".into(),
        ),
        (
            "templates/crm_shipped.hbs".into(),
            "CRM: {{_event.source}} {{orderId}}".into(),
        ),
    ];
    TestOptions {
        files,
        ..TestOptions::default()
    }
}

fn routes_of(answer: &Value) -> Vec<String> {
    answer["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["route"].as_str().unwrap().to_owned())
        .collect()
}

#[actix_rt::test]
async fn each_source_takes_its_own_routes_and_the_same_id_is_no_duplicate_across_sources() {
    let app = spawn_app_with(two_sources_options()).await;
    let event = sample("order_shipped");

    let (oms_status, oms) = app.post_event("oms", &event).await;
    let (crm_status, crm) = app.post_event("crm", &event).await;

    assert_eq!(oms_status, 202, "{oms}");
    assert_eq!(
        crm_status, 202,
        "not a duplicate: same id, other source: {crm}"
    );
    assert_eq!(routes_of(&oms), ["order-shipped"]);
    assert_eq!(routes_of(&crm), ["crm-shipped"]);
    let got = app.wait_for_delivered(2).await;
    assert_eq!(got.len(), 2, "{got:#?}");
    let crm_msg = got
        .iter()
        .find(|r| r.business_id == 333)
        .expect("crm message");
    assert_eq!(crm_msg.chat_id, 5001);
    assert_eq!(crm_msg.message, "CRM: crm 51234567");
    assert!(got
        .iter()
        .any(|r| r.business_id == 111 && r.message.starts_with("Здравствуйте!")));
    app.stop().await;
}

#[actix_rt::test]
async fn a_continue_route_lets_later_routes_match_the_same_event() {
    let app = spawn_app_with(two_sources_options()).await;
    let mut courier = sample("order_shipped");
    courier["delivery"] = json!({"type": "COURIER"});
    let mut pickup = sample("order_delivered");
    pickup["delivery"] = json!({"type": "PICKUP"});

    let (status, both) = app.post_event("oms", &courier).await;
    assert_eq!(status, 202, "{both}");
    let (status, one) = app.post_event("oms", &pickup).await;
    assert_eq!(status, 202, "{one}");

    assert_eq!(routes_of(&both), ["courier-note", "order-shipped"]);
    assert_eq!(routes_of(&one), ["order-delivered"]);
    let got = app.wait_for_delivered(3).await;
    assert_eq!(got.len(), 3, "{got:#?}");
    let chat_5001: Vec<&str> = got
        .iter()
        .filter(|r| r.chat_id == 5001)
        .map(|r| r.message.as_str())
        .collect();
    assert_eq!(chat_5001.len(), 2);
    assert_eq!(
        chat_5001[0], "Курьер привезёт заказ №51234567",
        "routes' messages go in route order"
    );
    assert!(chat_5001[1].contains("RU123456789"));
    assert_eq!(app.all_deliveries().await.len(), 3);
    assert_eq!(app.market.requests().len(), 3);
    app.stop().await;
}

#[actix_rt::test]
async fn a_retried_webhook_without_an_id_field_is_known_by_its_webhook_id() {
    let app = spawn_app().await;
    let mut event = sample("order_shipped");
    event.as_object_mut().unwrap().remove("id");
    let text = event.to_string().into_bytes();
    let headers = signed_headers(&text, now_secs(&app));

    let (first_status, first) = app.post_raw("/hooks/oms", &headers, text.clone()).await;
    let (second_status, second) = app.post_raw("/hooks/oms", &headers, text).await;

    assert_eq!(first_status, 202, "{first}");
    assert_eq!(
        first["event_id"],
        headers[1].1.as_str(),
        "the webhook-id names the event"
    );
    assert_eq!(second_status, 200, "{second}");
    assert_eq!(second["duplicate"], true);
    assert_eq!(delivery_ids(&second), delivery_ids(&first));
    assert_eq!(delivery_ids(&first).len(), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn an_absurd_timestamp_is_401_not_a_crash() {
    let app = spawn_app().await;
    let text = sample("order_shipped").to_string().into_bytes();

    for ts in [i64::MIN, i64::MAX, -1] {
        let headers = signed_headers(&text, ts);
        let (status, body) = app.post_raw("/hooks/oms", &headers, text.clone()).await;
        assert_error(status, &body, 401, Some("unauthorized"));
    }

    assert_nothing_stored_or_sent(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_hook_called_with_the_wrong_method_answers_a_json_error() {
    let app = spawn_app().await;

    let (status, body) = app.get("/hooks/oms").await;

    assert!(status == 404 || status == 405, "{status}");
    assert_error(status, &body, status, None);
    app.stop().await;
}

/// The value of a counter sample in `/metrics`, 0 when absent.
async fn metric(app: &TestApp, sample: &str) -> i64 {
    let mut resp = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("request failed");
    let text = String::from_utf8(resp.body().await.unwrap().to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0)
}

#[actix_rt::test]
async fn a_reused_event_id_with_another_body_is_409_event_id_conflict_and_counted() {
    let app = spawn_app().await;
    let shipped = sample("order_shipped");
    let mut delivered = sample("order_delivered");
    delivered["id"] = shipped["id"].clone();

    let (first_status, first) = app.post_event("oms", &shipped).await;
    let (status, body) = app.post_event("oms", &delivered).await;

    assert_eq!(first_status, 202, "{first}");
    assert_error(status, &body, 409, Some("event_id_conflict"));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("evt-1001")
            && message.contains("differs")
            && message.contains("received at"),
        "the message names the id, the difference and when the first came: {message}"
    );
    assert_eq!(
        delivery_ids(&first).len(),
        app.all_deliveries().await.len(),
        "nothing stored for the conflicting event"
    );
    assert_eq!(
        metric(
            &app,
            r#"chatbridge_webhooks_total{outcome="event_id_conflict",source="oms"}"#
        )
        .await,
        1
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_repeat_with_other_key_order_and_spacing_is_still_a_duplicate() {
    let app = spawn_app().await;
    let first = r#"{"id":"evt-77","type":"order.shipped","businessId":111,"chatId":5001,"orderId":1,"shop":{"name":"A"},"items":{"count":1},"tracking":{"number":"X","carrier":"C"}}"#;
    let again = r#"{ "tracking": {"carrier": "C", "number": "X"}, "items": {"count": 1},
        "shop": {"name": "A"}, "orderId": 1, "chatId": 5001, "businessId": 111,
        "type": "order.shipped", "id": "evt-77" }"#;
    let ts = now_secs(&app);

    let (s1, b1) = app
        .post_raw(
            "/hooks/oms",
            &signed_headers(first.as_bytes(), ts),
            first.into(),
        )
        .await;
    let (s2, b2) = app
        .post_raw(
            "/hooks/oms",
            &signed_headers(again.as_bytes(), ts),
            again.into(),
        )
        .await;

    assert_eq!(s1, 202, "{b1}");
    assert_eq!(s2, 200, "{b2}");
    assert_eq!(b2["duplicate"], true, "{b2}");
    app.stop().await;
}

#[actix_rt::test]
async fn an_event_with_its_own_event_member_is_compared_as_sent_when_repeated() {
    // Templates see chatbridge's `_event` in place of the event's own; the
    // duplicate check must still compare the event as it was posted.
    let app = spawn_app().await;
    let mut event = sample_as("order_shipped", "evt-own-meta", None);
    event["_event"] = serde_json::json!({"origin": "oms", "seq": 7});
    let (first, body) = app.post_event("oms", &event).await;
    assert_eq!(first, 202, "{body}");
    let (again, body) = app.post_event("oms", &event).await;
    assert_eq!(again, 200, "the same event again: {body}");
    assert_eq!(body["duplicate"], true, "{body}");

    event["_event"]["seq"] = serde_json::json!(8);
    let (other, body) = app.post_event("oms", &event).await;
    assert_eq!(other, 409, "another event under that id: {body}");
    assert_eq!(body["error"]["code"], "event_id_conflict", "{body}");
    app.stop().await;
}

#[actix_rt::test]
async fn two_different_events_racing_with_one_id_store_one_and_refuse_the_other() {
    let app = spawn_app().await;
    for round in 0..8 {
        let id = format!("race-{round}");
        let shipped = sample_as("order_shipped", &id, None);
        let delivered = sample_as("order_delivered", &id, None);

        let ((s1, b1), (s2, b2)) = tokio::join!(
            app.post_event("oms", &shipped),
            app.post_event("oms", &delivered)
        );

        let mut statuses = [s1, s2];
        statuses.sort();
        assert_eq!(statuses, [202, 409], "round {round}: {b1} / {b2}");
    }
    assert_eq!(app.all_deliveries().await.len(), 8);
    app.stop().await;
}

#[actix_rt::test]
async fn a_failed_render_keeps_the_business_and_chat_it_rendered() {
    let files = vec![
        shipped_routes_plus(
            r#"
[[routes]]
name = "broken-text"
source = "oms"
event = "custom.broken"
template = "broken"
business_id = "{{businessId}}"
chat_id = "{{chatId}}"
"#,
        ),
        ("templates/broken.hbs".into(), "{{no.such.field}}".into()),
    ];
    let app = spawn_app_with(TestOptions {
        files,
        ..TestOptions::default()
    })
    .await;
    let event =
        json!({"id": "evt-broken", "type": "custom.broken", "businessId": 111, "chatId": 6061});

    let (status, body) = app.post_event("oms", &event).await;
    let (list_status, list) = app
        .admin_get("/admin/deliveries?chat_id=6061&state=failed")
        .await;

    assert_eq!(status, 202, "{body}");
    assert_eq!(body["deliveries"][0]["state"], "failed", "{body}");
    assert_eq!(list_status, 200, "{list}");
    let found = list["deliveries"].as_array().unwrap();
    assert_eq!(
        found.len(),
        1,
        "filtering by chat finds the failed message: {list}"
    );
    assert_eq!(found[0]["business_id"], 111, "{list}");
    assert_eq!(found[0]["chat_id"], 6061, "{list}");
    assert!(
        found[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no.such.field")
            || found[0]["reason"].as_str().unwrap().contains("broken"),
        "{list}"
    );
    app.stop().await;
}
