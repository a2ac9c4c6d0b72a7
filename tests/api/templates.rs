//! What the buyer reads: the shipped templates rendered from the shipped
//! sample events, plain text (nothing HTML-escaped, nothing trimmed), and a
//! template that cannot be rendered never sends a message with a hole.

use serde_json::{json, Value};

use crate::helpers::*;

/// (sample, business, chat, the exact text), checked by hand against
/// templates/*.hbs and templates/partials/signature.hbs.
const EXPECTED: [(&str, i64, i64, &str); 4] = [
    (
        "order_shipped",
        111,
        5001,
        "Здравствуйте! Ваш заказ №51234567 отправлен: 3 товара уже в пути.\n\
         Служба доставки: СДЭК, трек-номер для отслеживания: RU123456789.\n\
         С уважением, команда Дом & Сад \"Уют\"",
    ),
    (
        "order_delivered",
        111,
        5002,
        "Здравствуйте! Ваш заказ №51234568 доставлен. Надеемся, покупка Вас порадует!\n\
         Будем очень благодарны, если Вы оставите отзыв о товаре на Маркете: он поможет другим покупателям и нам.\n\
         С уважением, команда Дом & Сад \"Уют\"",
    ),
    (
        "return_approved",
        222,
        5003,
        "Здравствуйте! Мы одобрили возврат по заказу №51234569.\n\
         Сумма к возврату — 1 234,50 ₽, деньги поступят до 01.12.2026 тем же способом, которым Вы оплачивали заказ.\n\
         С уважением, команда ТехноМир",
    ),
    (
        "order_cancelled",
        111,
        5004,
        "Здравствуйте! К сожалению, Ваш заказ №51234570 отменён.\n\
         Причина: товара не оказалось на складе\n\
         Если заказ был оплачен, деньги вернутся автоматически. Остались вопросы? Напишите нам в этот чат.\n\
         С уважением, команда Дом & Сад \"Уют\"",
    ),
];

/// Posts a valid event to chat 9999 and waits until the Market has it: a
/// barrier after which anything sendable that was stored earlier has been
/// sent too (one business, claimed oldest first).
async fn barrier(app: &TestApp) {
    let body = json!({"id": format!("barrier-{}", rand_id()), "type": "custom.text",
                      "businessId": 111, "chatId": 9999, "text": "barrier"});
    let (status, answer) = app.post_event("oms", &body).await;
    assert_eq!(status, 202, "{answer}");
    app.wait_for_state(answer["deliveries"][0]["id"].as_i64().unwrap(), "delivered")
        .await;
}

#[actix_rt::test]
async fn each_shipped_sample_reaches_its_chat_with_the_exact_text() {
    let app = spawn_app().await;

    let mut ids = Vec::new();
    for (name, ..) in EXPECTED {
        let (status, body) = app.post_event("oms", &sample(name)).await;
        assert_eq!(status, 202, "{name}: {body}");
        assert_eq!(
            body["deliveries"].as_array().unwrap().len(),
            1,
            "{name}: {body}"
        );
        ids.push(body["deliveries"][0]["id"].as_i64().unwrap());
    }
    for id in &ids {
        app.wait_for_state(*id, "delivered").await;
    }

    let got = app.market.delivered();
    assert_eq!(got.len(), 4, "{got:#?}");
    for ((name, business, chat, text), id) in EXPECTED.iter().zip(&ids) {
        let sent: Vec<_> = got.iter().filter(|r| r.chat_id == *chat).collect();
        assert_eq!(sent.len(), 1, "{name}: one message in chat {chat}");
        assert_eq!(sent[0].business_id, *business, "{name}: business");
        assert_eq!(sent[0].message, *text, "{name}: the text the buyer reads");
        let stored = app.delivery(*id).await;
        assert_eq!(stored["delivery"]["text"], *text, "{name}: stored text");
        assert_eq!(stored["delivery"]["business_id"], *business, "{name}");
        assert_eq!(stored["delivery"]["chat_id"], *chat, "{name}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn ampersands_quotes_and_cyrillic_in_the_shop_name_arrive_unescaped() {
    let app = spawn_app().await;

    let (status, body) = app.post_event("oms", &sample("order_shipped")).await;
    assert_eq!(status, 202, "{body}");
    app.wait_for_state(body["deliveries"][0]["id"].as_i64().unwrap(), "delivered")
        .await;

    let message = &app.market.delivered()[0].message;
    assert!(message.ends_with("команда Дом & Сад \"Уют\""), "{message}");
    for escaped in ["&amp;", "&quot;", "&#x27;", "&#34;", "\\\""] {
        assert!(!message.contains(escaped), "{escaped} in {message}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn markup_and_entities_in_event_text_arrive_byte_for_byte() {
    let app = spawn_app_with(TestOptions {
        files: custom_text_files(),
        ..TestOptions::default()
    })
    .await;
    let text = "<b>&amp;</b> Tom & \"Jerry\" <Ёж> 'x' \\ / {{not.a.field}} 😀\n\tконец  ";

    let (status, body) = app
        .post_event(
            "oms",
            &json!({"id": "esc-1", "type": "custom.text", "businessId": 111, "chatId": 77, "text": text}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    app.wait_for_state(body["deliveries"][0]["id"].as_i64().unwrap(), "delivered")
        .await;

    let got = app.market.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.as_bytes(), text.as_bytes());
    let wire: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(wire["message"], text, "the JSON body on the wire");
    app.stop().await;
}

#[actix_rt::test]
async fn a_missing_field_fails_the_delivery_keeps_the_event_and_sends_nothing() {
    let app = spawn_app_with(TestOptions {
        files: custom_text_files(),
        ..TestOptions::default()
    })
    .await;
    let mut event = sample("order_shipped");
    event["tracking"].as_object_mut().unwrap().remove("number");

    let (status, body) = app.post_event("oms", &event).await;

    assert_eq!(status, 202, "the event is accepted: {body}");
    assert_eq!(body["deliveries"][0]["state"], "failed", "{body}");
    let id = body["deliveries"][0]["id"].as_i64().unwrap();
    let stored = app.delivery(id).await;
    assert_eq!(stored["delivery"]["state"], "failed", "{stored:#}");
    let reason = stored["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("tracking.number"),
        "reason must name the field: {reason}"
    );
    assert_eq!(stored["attempts"], json!([]), "never attempted");
    let event_id = stored["delivery"]["event_id"].as_i64().unwrap();
    let (status, kept) = app.admin_get(&format!("/admin/events/{event_id}")).await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["payload"], event, "the event is kept as received");
    assert_eq!(kept["event_id"], "evt-1001");
    barrier(&app).await;
    assert!(
        app.market.requests().iter().all(|r| r.chat_id == 9999),
        "nothing but the barrier reached the Market: {:#?}",
        app.market.requests()
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_helper_given_a_missing_field_fails_instead_of_leaving_a_hole() {
    let app = spawn_app_with(TestOptions {
        files: custom_text_files(),
        ..TestOptions::default()
    })
    .await;
    let mut event = sample("return_approved");
    event["refund"].as_object_mut().unwrap().remove("amount");

    let (status, body) = app.post_event("oms", &event).await;

    assert_eq!(status, 202, "{body}");
    let stored = app
        .delivery(body["deliveries"][0]["id"].as_i64().unwrap())
        .await;
    assert_eq!(stored["delivery"]["state"], "failed", "{stored:#}");
    let reason = stored["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("refund.amount"),
        "reason must name the field: {reason}"
    );
    barrier(&app).await;
    assert!(app.market.requests().iter().all(|r| r.chat_id == 9999));
    app.stop().await;
}

#[actix_rt::test]
async fn a_message_over_4096_characters_fails_and_is_never_sent() {
    let app = spawn_app_with(TestOptions {
        files: custom_text_files(),
        ..TestOptions::default()
    })
    .await;
    // 4097 code points, 8194 bytes.
    let text = "я".repeat(4097);

    let (status, body) = app
        .post_event(
            "oms",
            &json!({"id": "long-1", "type": "custom.text", "businessId": 111, "chatId": 78, "text": text}),
        )
        .await;

    assert_eq!(status, 202, "{body}");
    let stored = app
        .delivery(body["deliveries"][0]["id"].as_i64().unwrap())
        .await;
    assert_eq!(stored["delivery"]["state"], "failed", "{stored:#}");
    let reason = stored["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("4096"),
        "reason must give the limit: {reason}"
    );
    barrier(&app).await;
    assert!(app.market.requests().iter().all(|r| r.chat_id == 9999));
    app.stop().await;
}

#[actix_rt::test]
async fn the_text_keeps_the_templates_leading_and_trailing_whitespace() {
    let mut files = custom_text_files();
    files.push(("templates/custom_text.hbs".into(), "  {{text}}\n\n".into()));
    let app = spawn_app_with(TestOptions {
        files,
        ..TestOptions::default()
    })
    .await;

    let (status, body) = app
        .post_event(
            "oms",
            &json!({"id": "ws-1", "type": "custom.text", "businessId": 111, "chatId": 79, "text": "x"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    app.wait_for_state(body["deliveries"][0]["id"].as_i64().unwrap(), "delivered")
        .await;

    assert_eq!(app.market.delivered()[0].message, "  x\n\n");
    app.stop().await;
}

#[actix_rt::test]
async fn a_failed_delivery_sends_the_fixed_template_when_an_operator_retries_it() {
    let mut files = custom_text_files();
    files.push((
        "templates/order_delivered.hbs".into(),
        "Отзыв: {{review.link}}".into(),
    ));
    let app = spawn_app_with(TestOptions {
        files,
        ..TestOptions::default()
    })
    .await;
    let (status, body) = app.post_event("oms", &sample("order_delivered")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["deliveries"][0]["id"].as_i64().unwrap();
    assert_eq!(body["deliveries"][0]["state"], "failed");

    // The operator fixes the template and restarts the service with it.
    std::fs::write(
        app.root.path().join("templates/order_delivered.hbs"),
        "Заказ №{{orderId}} доставлен. {{> signature}}",
    )
    .unwrap();
    let app = app.restart().await;
    let (status, retried) = app
        .admin_post(&format!("/admin/deliveries/{id}/retry"), &json!({}))
        .await;

    assert_eq!(status, 200, "{retried}");
    let done = app.wait_for_state(id, "delivered").await;
    let text = "Заказ №51234568 доставлен. С уважением, команда Дом & Сад \"Уют\"";
    assert_eq!(done["delivery"]["text"], text);
    assert_eq!(app.market.delivered().len(), 1);
    assert_eq!(app.market.delivered()[0].message, text);
    assert_eq!(app.market.delivered()[0].chat_id, 5002);
    app.stop().await;
}

#[actix_rt::test]
async fn an_object_printed_as_text_fails_the_delivery_naming_the_field_and_sends_nothing() {
    let mut files = custom_text_files();
    files.push((
        "templates/order_shipped.hbs".into(),
        "Заказ {{orderId}} {{tracking}}".into(),
    ));
    let app = spawn_app_with(TestOptions {
        files,
        ..TestOptions::default()
    })
    .await;

    let (status, body) = app.post_event("oms", &sample("order_shipped")).await;

    assert_eq!(status, 202, "{body}");
    assert_eq!(body["deliveries"][0]["state"], "failed", "{body}");
    let stored = app
        .delivery(body["deliveries"][0]["id"].as_i64().unwrap())
        .await;
    let reason = stored["delivery"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("field \"tracking\" is an object") && reason.contains("line 1, column 19"),
        "reason must name the field, line and column: {reason}"
    );
    barrier(&app).await;
    assert!(
        app.market.requests().iter().all(|r| r.chat_id == 9999),
        "no \"[object]\" reached a buyer: {:#?}",
        app.market.requests()
    );
    app.stop().await;
}

/// The Handlebars built-ins that work under our strict, unescaped
/// registry (the README lists them): blocks over objects and lists,
/// comparisons, `lookup` and `len`.
#[actix_rt::test]
async fn handlebars_builtins_work_on_objects_and_lists_in_a_message() {
    let mut files = custom_text_files();
    files.push((
        "templates/custom_text.hbs".into(),
        concat!(
            "{{#with order}}№{{id}}{{/with}}; ",
            "{{#each order.items}}{{@index}}:{{sku}}×{{qty}}{{#unless @last}}, {{/unless}}{{/each}}; ",
            "{{#each order.delivery}}{{@key}}={{this}}{{/each}}; ",
            "{{#if order.paid}}оплачен{{else}}не оплачен{{/if}}; ",
            "{{#if order.missing}}-{{else}}нет поля{{/if}}; ",
            "{{#if (eq order.delivery.type \"COURIER\")}}курьер{{/if}} ",
            "{{#if (and (gt (len order.items) 1) (not order.gift))}}много{{/if}} ",
            "{{#if (or (lt 1 0) (gte 2 2) (lte 3 1) (ne 1 2))}}да{{/if}}; ",
            "{{lookup order.tags 1}} {{lookup order.delivery \"type\"}} {{len order.items}}; ",
            "{{{{raw}}}}{{as is}}{{{{/raw}}}}",
        )
        .into(),
    ));
    let app = spawn_app_with(TestOptions {
        files,
        ..TestOptions::default()
    })
    .await;
    let event = json!({"id": "bi-1", "type": "custom.text", "businessId": 111, "chatId": 80,
        "order": {"id": 7, "paid": true, "gift": false, "tags": ["a", "b"],
                  "delivery": {"type": "COURIER"},
                  "items": [{"sku": "X", "qty": 2}, {"sku": "Y", "qty": 1}]}});

    let (status, body) = app.post_event("oms", &event).await;
    assert_eq!(status, 202, "{body}");
    let done = app
        .wait_for_state(body["deliveries"][0]["id"].as_i64().unwrap(), "delivered")
        .await;

    assert_eq!(
        done["delivery"]["text"],
        "№7; 0:X×2, 1:Y×1; type=COURIER; оплачен; нет поля; курьер много да; b COURIER 2; {{as is}}"
    );
    app.stop().await;
}
