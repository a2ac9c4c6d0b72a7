//! The fake as the Market's notifier: it POSTs a notification to a
//! seller's registered URL plus `/notification`, as the Market does
//! (`notifications.openapi.yaml`: a 10-second timeout, 1 second for
//! `PING`), as many times as asked, and reports each answer. In process:
//! [`push`]; over HTTP: `POST /_fake/notify` with
//! `{"url": "http://host/hooks/market", "notification": {...}, "times": 1}`.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What one push was answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushAnswer {
    /// `None`: no answer (timeout, connection refused): see `error`.
    pub status: Option<u16>,
    /// The answer's body, as JSON when it is JSON, else as a string.
    pub body: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// POSTs `notification` to `<url>/notification` `times` times, one after
/// the other, and returns what each was answered.
pub async fn push(url: &str, notification: &Value, times: u32) -> Vec<PushAnswer> {
    let is_ping = notification["notificationType"] == "PING";
    let timeout = Duration::from_secs(if is_ping { 1 } else { 10 });
    let client = awc::Client::builder().timeout(timeout).finish();
    let target = format!("{}/notification", url.trim_end_matches('/'));
    let mut answers = Vec::new();
    for _ in 0..times.max(1) {
        let sent = client
            .post(&target)
            .insert_header(("content-type", "application/json"))
            .send_body(notification.to_string())
            .await;
        answers.push(match sent {
            Ok(mut response) => {
                let body = response.body().limit(1 << 20).await.unwrap_or_default();
                PushAnswer {
                    status: Some(response.status().as_u16()),
                    body: serde_json::from_slice(&body)
                        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body))),
                    error: None,
                }
            }
            Err(e) => PushAnswer {
                status: None,
                body: Value::Null,
                error: Some(e.to_string()),
            },
        });
    }
    answers
}

#[derive(Deserialize)]
pub(super) struct NotifyRequest {
    url: String,
    notification: Value,
    #[serde(default = "one")]
    times: u32,
}

fn one() -> u32 {
    1
}

pub(super) async fn notify(request: web::Json<NotifyRequest>) -> HttpResponse {
    let request = request.into_inner();
    if !(request.url.starts_with("http://") || request.url.starts_with("https://")) {
        return HttpResponse::BadRequest().json(json!({
            "error": "url must be the seller's registered URL, like http://127.0.0.1:8080/hooks/market"
        }));
    }
    let answers = push(&request.url, &request.notification, request.times.min(100)).await;
    HttpResponse::Ok().json(json!({ "answers": answers }))
}
