//! What an operator does in the console, in a real browser.

use std::time::{Duration, Instant};

use chatbridge::market::fake::ScriptedAnswer;
use chatbridge::store::ApiErrorEntry;
use fantoccini::Locator;
use serde_json::{json, Value};

use crate::browser::Browser;
use crate::helpers::{sample, spawn_app, spawn_app_with, TestApp, TestOptions};

fn market_refuses(app: &TestApp, code: &str, message: &str) {
    app.market.script(ScriptedAnswer {
        status: 400,
        errors: vec![ApiErrorEntry {
            code: code.into(),
            message: Some(message.into()),
        }],
        business_id: None,
        chat_id: None,
        times: 1,
        ..Default::default()
    });
}

/// Posts an event and returns its one delivery's id.
async fn post(app: &TestApp, event: &Value) -> i64 {
    let (status, body) = app.post_event("oms", event).await;
    assert!(status == 202 || status == 200, "{status} {body}");
    body["deliveries"][0]["id"].as_i64().expect("a delivery")
}

/// Reloads the page until `css` shows `text` (bounded, real time).
async fn reload_until(browser: &Browser, css: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if browser.text(css).await.contains(text) {
            return;
        }
        assert!(Instant::now() < deadline, "{css} never showed {text:?}");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        browser.client.refresh().await.unwrap();
    }
}

#[actix_rt::test]
async fn an_operator_finds_a_dead_delivery_reads_the_market_error_and_retries_it() {
    let app = spawn_app().await;
    market_refuses(&app, "CHAT_NOT_FOUND", "Чат 5001 не найден");
    let dead = post(&app, &sample("order_shipped")).await;
    app.wait_for_state(dead, "dead").await;
    let delivered = post(&app, &sample("order_delivered")).await;
    app.wait_for_state(delivered, "delivered").await;
    let Some(browser) = Browser::start(&app.base).await else {
        return;
    };

    browser.goto("/ui/").await;
    assert_eq!(
        browser.path().await,
        "/ui/login",
        "no session: the login page"
    );
    browser.screenshot("login").await;
    browser.login().await;
    assert!(browser.text("#business-111").await.contains("111"));
    browser.screenshot("overview").await;
    browser.phone_screenshot("overview-phone").await;

    browser.goto("/ui/deliveries").await;
    browser
        .wait("#f-state")
        .await
        .select_by_value("dead")
        .await
        .unwrap();
    browser.click_to_next_page("#find").await;
    let listed = browser.text("#deliveries").await;
    assert!(listed.contains(&dead.to_string()), "{listed}");
    assert!(
        !listed.contains(&format!("\n{delivered} ")),
        "only dead ones: {listed}"
    );
    browser.screenshot("deliveries").await;
    let link = browser
        .client
        .find(Locator::LinkText(&dead.to_string()))
        .await
        .unwrap();
    browser.follow(link).await;
    let errors = browser.text("#attempts").await;
    assert!(
        errors.contains("CHAT_NOT_FOUND: Чат 5001 не найден") && errors.contains("400"),
        "the Market's answer: {errors}"
    );
    browser.screenshot("delivery").await;

    browser.click_to_next_page("#retry").await;
    browser.wait("#notice").await;
    reload_until(&browser, "#state", "Доставлено").await;
    let done = app.delivery(dead).await;
    assert_eq!(done["delivery"]["state"], "delivered", "{done:#}");
    assert_eq!(app.market.delivered().len(), 2);

    // A bulk retry shows its count first, then does it.
    market_refuses(&app, "CHAT_NOT_FOUND", "Чат 5001 не найден");
    let second = post(&app, &sample("order_cancelled")).await;
    app.wait_for_state(second, "dead").await;
    browser.goto("/ui/deliveries?state=dead").await;
    browser.click_to_next_page("#retry-all").await;
    let count = browser.wait("#retry-count").await;
    assert_eq!(count.text().await.unwrap(), "1");
    assert_eq!(
        app.delivery(second).await["delivery"]["state"],
        "dead",
        "the preview changes nothing"
    );
    browser.screenshot("retry-preview").await;
    browser.click_to_next_page("#confirm-retry").await;
    assert_eq!(browser.text("#queued-count").await, "1");
    app.wait_for_state(second, "delivered").await;
    browser.close().await;
    app.stop().await;
}

#[actix_rt::test]
async fn the_playground_renders_a_stored_event_and_an_edited_template_without_sending() {
    let app = spawn_app().await;
    let id = post(&app, &sample("order_shipped")).await;
    app.wait_for_state(id, "delivered").await;
    let sent = app.market.requests().len();
    let template_file = app.root.path().join("templates/order_shipped.hbs");
    let on_disk = std::fs::read_to_string(&template_file).unwrap();
    let Some(browser) = Browser::start(&app.base).await else {
        return;
    };
    browser.login().await;

    browser.goto(&format!("/ui/playground?delivery={id}")).await;
    let result = browser.text("#results").await;
    assert!(
        result.contains("order-shipped") && result.contains("RU123456789"),
        "the route and its text: {result}"
    );

    browser
        .wait("#pg-template")
        .await
        .select_by_value("order_shipped")
        .await
        .unwrap();
    let editor = browser.wait("#pg-text").await;
    assert_eq!(
        editor.prop("value").await.unwrap().unwrap_or_default(),
        on_disk,
        "the editor starts from the template in force"
    );
    editor.clear().await.unwrap();
    editor.send_keys("Заказ {{orderId}} в пути").await.unwrap();
    reload_free_wait(&browser, "#results", "Заказ 51234567 в пути").await;
    assert_eq!(
        browser.text("#results .length").await,
        "Заказ 51234567 в пути".chars().count().to_string()
    );
    browser.screenshot("playground").await;

    editor.clear().await.unwrap();
    editor.send_keys("Трек {{tracking.code}}").await.unwrap();
    reload_free_wait(&browser, "#results", "tracking.code").await;
    let error = browser.text("#results .render-error").await;
    assert!(error.contains("missing"), "the exact render error: {error}");

    editor.clear().await.unwrap();
    editor
        .send_keys("{{#if orderId}}never closed")
        .await
        .unwrap();
    reload_free_wait(&browser, "#results", "{{/if}}").await;

    assert_eq!(app.market.requests().len(), sent, "nothing was sent");
    assert_eq!(std::fs::read_to_string(&template_file).unwrap(), on_disk);
    let fresh = post(
        &app,
        &json!({"type": "order.shipped", "id": "evt-after",
        "businessId": 111, "chatId": 5001, "orderId": 7, "shop": {"name": "X"},
        "items": {"count": 1}, "tracking": {"number": "T-1", "carrier": "C"}}),
    )
    .await;
    let after = app.wait_for_state(fresh, "delivered").await;
    assert!(
        after["delivery"]["text"].as_str().unwrap().contains("T-1"),
        "the templates in force are untouched: {after:#}"
    );
    browser.close().await;
    app.stop().await;
}

/// Waits for the page's script to update `css` (no reload: the
/// playground renders as one types).
async fn reload_free_wait(browser: &Browser, css: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = browser.text(css).await;
        if now.contains(text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{css} never showed {text:?}: {now}"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn a_script_in_a_payload_or_a_market_message_shows_as_text_and_runs_nothing() {
    let app = spawn_app().await;
    let hostile = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">";
    let mut event = sample("order_shipped");
    event["shop"]["name"] = json!(hostile);
    market_refuses(&app, "<script>window.__pwned = 3</script>", hostile);
    let id = post(&app, &event).await;
    app.wait_for_state(id, "dead").await;
    let Some(browser) = Browser::start(&app.base).await else {
        return;
    };
    browser.login().await;

    for page in [
        format!("/ui/deliveries/{id}"),
        "/ui/deliveries?state=dead".to_owned(),
        format!("/ui/playground?delivery={id}"),
    ] {
        browser.goto(&page).await;
        let text = browser.body().await;
        assert!(
            text.contains("<script>window.__pwned = 1</script>"),
            "{page} shows the payload as text: {text}"
        );
        let ran = browser
            .client
            .execute(
                "return window.__pwned === undefined ? null : window.__pwned;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(ran, Value::Null, "{page} ran the hostile script");
        // Escaped, not merely blocked by the Content-Security-Policy: the
        // page holds no element that came from the payload.
        let injected = browser
            .client
            .execute(
                "return document.querySelectorAll('main script, main img').length;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            injected,
            json!(0),
            "{page} turned the payload into elements"
        );
    }
    browser.close().await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_post_without_the_csrf_token_is_refused_and_logout_ends_the_session() {
    let app = spawn_app().await;
    market_refuses(&app, "CHAT_NOT_FOUND", "нет чата");
    let id = post(&app, &sample("order_shipped")).await;
    app.wait_for_state(id, "dead").await;
    let Some(browser) = Browser::start(&app.base).await else {
        return;
    };
    browser.login().await;
    browser.goto(&format!("/ui/deliveries/{id}")).await;
    browser.wait("#retry").await;

    browser
        .client
        .execute(
            "document.querySelectorAll('input[name=csrf]').forEach(e => e.remove());",
            vec![],
        )
        .await
        .unwrap();
    browser.click_to_next_page("#retry").await;

    let error = browser.text("#error").await;
    assert!(error.contains("CSRF"), "refused: {error}");
    assert_eq!(browser.text("h1").await, "403");
    assert_eq!(
        app.delivery(id).await["delivery"]["state"],
        "dead",
        "nothing was retried"
    );

    browser.goto("/ui/").await;
    browser.click_to_next_page("button.link").await;
    browser.wait("#token").await;
    browser.goto("/ui/deliveries").await;
    assert_eq!(browser.path().await, "/ui/login", "logged out");
    browser.close().await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_page_without_the_session_cookie_goes_to_the_login() {
    let app = spawn_app().await;
    let Some(browser) = Browser::start(&app.base).await else {
        return;
    };
    for page in ["/ui/", "/ui/deliveries?state=dead", "/ui/playground"] {
        browser.goto(page).await;
        assert_eq!(browser.path().await, "/ui/login", "{page}");
    }
    browser.wait("#token").await;
    browser.close().await;
    app.stop().await;
}

#[actix_rt::test]
async fn with_the_admin_api_off_the_console_is_off() {
    let app = spawn_app_with(TestOptions {
        tweak: Some(Box::new(|s| s.admin.token = None)),
        ..TestOptions::default()
    })
    .await;
    for page in ["/ui/", "/ui/login", "/ui/static/console.js"] {
        let resp = app
            .client
            .get(format!("{}{page}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 404, "{page}");
    }
    app.stop().await;
}
