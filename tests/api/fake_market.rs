//! The fake Market's `/_fake/config`, as a tester drives it over HTTP:
//! read it, change some fields, and be told about a typo or an
//! impossible value instead of a silent reset.

use chatbridge::market::fake::FakeConfig;
use serde_json::{json, Value};

use crate::helpers::*;

async fn config_call(app: &TestApp, body: Option<&Value>) -> (u16, Value) {
    let url = format!("{}/_fake/config", app.market.base_url());
    let mut response = match body {
        Some(b) => app.client.post(&url).send_json(b).await,
        None => app.client.get(&url).send().await,
    }
    .expect("the fake Market answers");
    let value = response.json::<Value>().await.unwrap_or(Value::Null);
    (response.status().as_u16(), value)
}

#[actix_rt::test]
async fn the_fake_markets_config_can_be_read_and_changed_field_by_field() {
    let app = spawn_app_with(TestOptions {
        fake: FakeConfig {
            api_keys: vec![API_KEY.into()],
            hourly_limit: 7,
            ..FakeConfig::default()
        },
        ..TestOptions::default()
    })
    .await;

    let (status, config) = config_call(&app, None).await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["hourly_limit"], 7);
    assert_eq!(config["latency_ms"], 0);

    // Only latency_ms changes; the limit and the keys keep their values.
    let (status, changed) = config_call(&app, Some(&json!({"latency_ms": 5}))).await;
    assert_eq!(status, 200, "{changed}");
    let (_, config) = config_call(&app, None).await;
    assert_eq!(config["latency_ms"], 5);
    assert_eq!(config["hourly_limit"], 7, "omitted fields keep their value");
    assert_eq!(config["api_keys"], json!([API_KEY]));
    assert_eq!(changed, config);
    app.stop().await;
}

#[actix_rt::test]
async fn the_fake_market_refuses_unknown_fields_and_impossible_values_naming_them() {
    let app = spawn_app().await;
    let (_, before) = config_call(&app, None).await;
    for (body, named) in [
        (json!({"failure_rate": 5}), "failure_rate"),
        (json!({"failure_rate": -0.1}), "failure_rate"),
        (json!({"window_secs": 0}), "window_secs"),
        (json!({"hourly_limt": 10}), "hourly_limt"),
        (json!({"latency_ms": 1, "failure_rate": 2}), "failure_rate"),
    ] {
        let (status, answer) = config_call(&app, Some(&body)).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{body} -> {answer}");
    }
    let (_, after) = config_call(&app, None).await;
    assert_eq!(after, before, "a refused change changes nothing");
    app.stop().await;
}
