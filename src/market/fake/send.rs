//! The fake's `POST /v2/businesses/{businessId}/chats/message?chatId=`:
//! validation per `sendMessageToChat` in `chats.openapi.yaml`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::Value;

use super::{serve, FakeMethod, FakeState, Parsed};

#[derive(Deserialize)]
struct ChatQuery {
    #[serde(rename = "chatId")]
    chat_id: Option<String>,
}

pub(super) async fn send_message(
    state: web::Data<FakeState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    serve(
        state,
        req,
        FakeMethod::SendMessage,
        &path,
        &body,
        |req, body| {
            let chat = chat_id_query(req)?;
            if !is_json(req) {
                return Err("Content-Type must be application/json".into());
            }
            let message = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                .filter(|m| !m.is_empty() && m.chars().count() <= 4096)
                .ok_or("message must be a string of 1 to 4096 characters")?;
            Ok(Parsed {
                chat_id: Some(chat),
                message: Some(message),
                ..Parsed::default()
            })
        },
    )
    .await
}

/// The `chatId` query parameter the chat methods share.
pub(super) fn chat_id_query(req: &HttpRequest) -> Result<i64, String> {
    web::Query::<ChatQuery>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.chat_id.clone())
        .and_then(|c| c.parse::<i64>().ok())
        .filter(|&c| c >= 1)
        .ok_or_else(|| "chatId query parameter must be an integer of at least 1".to_owned())
}

pub(super) fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}
