//! The Market Partner API: the client chatbridge sends with, and a fake
//! of the same API for tests, trials and the demo.

pub mod client;
pub mod fake;

use serde::Deserialize;

use crate::store::ApiErrorEntry;

/// Every header name the Market uses for its quota, in one place.
pub const HEADER_API_KEY: &str = "Api-Key";
pub const HEADER_LIMIT: &str = "X-RateLimit-Resource-Limit";
pub const HEADER_REMAINING: &str = "X-RateLimit-Resource-Remaining";
pub const HEADER_UNTIL: &str = "X-RateLimit-Resource-Until";
pub const HEADER_INTEGRATION: &str = "X-Market-Integration";

/// The Market's error body. `status` is unreliable (official examples say
/// "OK" on errors) and `errors` may be absent: branch on the HTTP status.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
pub struct ApiResponse {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub errors: Vec<ApiErrorEntry>,
    /// `chats/new` answers `{"result":{"chatId":N}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ApiResult>,
}

#[derive(Debug, Default, Deserialize, serde::Serialize)]
pub struct ApiResult {
    #[serde(default, rename = "chatId", skip_serializing_if = "Option::is_none")]
    pub chat_id: Option<i64>,
}

/// `errors` is `nullable` in the spec.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ApiErrorEntry>, D::Error> {
    Ok(Option::<Vec<ApiErrorEntry>>::deserialize(d)?.unwrap_or_default())
}

pub fn send_message_path(business: i64, chat: i64) -> String {
    format!("/v2/businesses/{business}/chats/message?chatId={chat}")
}

pub fn create_chat_path(business: i64) -> String {
    format!("/v2/businesses/{business}/chats/new")
}

pub fn campaign_path(campaign: i64) -> String {
    format!("/v2/campaigns/{campaign}")
}
