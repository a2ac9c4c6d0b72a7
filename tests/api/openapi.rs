//! Every request chatbridge sends must be one the real Market accepts: each
//! recorded request is checked against the official description of its
//! method (`sendMessageToChat`, `createChat`) in
//! `spec/market-api/chats.openapi.yaml` (a vendored copy of the official file, so a plain clone checks
//! everything). The
//! constraints (parameters, security scheme, media type, body schema) are
//! read from the spec, not copied here.

use chatbridge::market::fake::{FakeMethod, ReceivedRequest};
use serde_json::json;

use crate::helpers::*;
use crate::spec::{load_spec, Operation};

const SPEC: &str = "chats.openapi.yaml";

/// The spec's path of each method chatbridge calls.
fn path_of(method: FakeMethod) -> &'static str {
    match method {
        FakeMethod::SendMessage => "/v2/businesses/{businessId}/chats/message",
        FakeMethod::CreateChat => "/v2/businesses/{businessId}/chats/new",
        other => panic!("chatbridge does not call {other:?}"),
    }
}

#[actix_rt::test]
async fn every_request_chatbridge_sends_matches_the_markets_openapi_description() {
    let spec = load_spec(SPEC);
    let app = spawn_app_with(TestOptions {
        files: custom_text_files(),
        ..TestOptions::default()
    })
    .await;
    // 4096 code points (the spec's maxLength today), 4097 UTF-16 units,
    // with markup, quotes and a line break.
    let long = format!("😀 <b>&\"</b>\n{}", "Ё".repeat(4096 - 12));
    assert_eq!(long.chars().count(), 4096);

    let mut ids = Vec::new();
    for name in [
        "order_shipped",
        "order_delivered",
        "return_approved",
        "order_cancelled",
        "order_ready_for_pickup",
    ] {
        let (status, body) = app.post_event("oms", &sample(name)).await;
        assert_eq!(status, 202, "{name}: {body}");
        ids.push(body["deliveries"][0]["id"].as_i64().unwrap());
    }
    let (status, body) = app
        .post_event(
            "oms",
            &json!({"id": "long", "type": "custom.text", "businessId": 222, "chatId": 9_007_199_254_740_993i64, "text": long}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    ids.push(body["deliveries"][0]["id"].as_i64().unwrap());
    for id in &ids {
        app.wait_for_state(*id, "delivered").await;
    }

    let requests = app.market.requests();
    // Six sends, and the chats/new call that found the chat of the
    // order-ready-for-pickup route's order.
    assert_eq!(requests.len(), 7, "{requests:#?}");
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.method == FakeMethod::CreateChat)
            .count(),
        1,
        "{requests:#?}"
    );
    let mut problems = Vec::new();
    for r in &requests {
        for p in Operation::from_spec(&spec, "post", path_of(r.method)).problems(r) {
            problems.push(format!(
                "{} {}: {p}",
                r.path_and_query,
                r.message.chars().take(40).collect::<String>()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "requests the Market would refuse:\n{}",
        problems.join("\n")
    );
    assert!(
        requests.iter().any(|r| r.message == long),
        "the long message went as is"
    );
    app.stop().await;
}

#[test]
fn the_spec_check_catches_requests_the_market_would_refuse() {
    let spec = load_spec(SPEC);
    let operation = Operation::from_spec(&spec, "post", path_of(FakeMethod::SendMessage));
    let good = ReceivedRequest {
        method: Default::default(),
        context: None,
        business_id: 111,
        chat_id: 5001,
        message: "ok".into(),
        at: 0,
        status: 200,
        path_and_query: "/v2/businesses/111/chats/message?chatId=5001".into(),
        headers: vec![
            ("api-key".into(), "<redacted>".into()),
            ("content-type".into(), "application/json".into()),
        ],
        body: r#"{"message":"ok"}"#.into(),
    };
    assert_eq!(operation.problems(&good), Vec::<String>::new());

    let bad = |change: &dyn Fn(&mut ReceivedRequest)| {
        let mut r = good.clone();
        change(&mut r);
        operation.problems(&r)
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "no chatId",
            bad(&|r| r.path_and_query = "/v2/businesses/111/chats/message".into()),
        ),
        (
            "chatId 0",
            bad(&|r| r.path_and_query = "/v2/businesses/111/chats/message?chatId=0".into()),
        ),
        (
            "businessId text",
            bad(&|r| r.path_and_query = "/v2/businesses/abc/chats/message?chatId=1".into()),
        ),
        (
            "old path",
            bad(&|r| r.path_and_query = "/businesses/111/chats/message?chatId=1".into()),
        ),
        (
            "no key",
            bad(&|r| r.headers.retain(|(k, _)| k != "api-key")),
        ),
        (
            "form body",
            bad(&|r| r.headers[1].1 = "application/x-www-form-urlencoded".into()),
        ),
        (
            "empty message",
            bad(&|r| r.body = r#"{"message":""}"#.into()),
        ),
        ("no message", bad(&|r| r.body = r#"{"text":"ok"}"#.into())),
        (
            "number message",
            bad(&|r| r.body = r#"{"message":5}"#.into()),
        ),
        (
            "4097 characters",
            bad(&|r| r.body = json!({"message": "ы".repeat(4097)}).to_string()),
        ),
        ("no body", bad(&|r| r.body = String::new())),
    ];
    for (what, problems) in cases {
        assert!(!problems.is_empty(), "{what} passed the check");
    }
}
