//! The Market methods chatbridge calls, with awc: send a chat message,
//! find (or open) the chat of an order or return (`chats/new`), and the
//! business a campaign belongs to (`GET /v2/campaigns/{id}`). One request
//! per call, no retries here: what an answer means is the dispatcher's
//! decision. Every request carries `X-Market-Integration`. awc's client is
//! `!Send`, so a [`MarketClient`] lives on the thread that made it.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use super::{ApiResponse, HEADER_API_KEY, HEADER_INTEGRATION, HEADER_REMAINING, HEADER_UNTIL};
use crate::clock::Millis;
use crate::domain::{BusinessId, ChatContext, ChatId};
use crate::store::ApiErrorEntry;

/// Bodies larger than this are cut: an error body is a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What the Market answered.
#[derive(Debug, Clone)]
pub struct MarketAnswer {
    pub status: u16,
    pub errors: Vec<ApiErrorEntry>,
    /// `X-RateLimit-Resource-Remaining`: sends left in the Market's window.
    pub remaining: Option<u32>,
    /// `X-RateLimit-Resource-Until`: when the Market's window resets.
    pub until: Option<Millis>,
    pub latency: Duration,
    /// `result.chatId` of a `chats/new` answer.
    pub chat_id: Option<ChatId>,
}

/// What `GET /v2/campaigns/{id}` answered.
#[derive(Debug, Clone)]
pub struct CampaignAnswer {
    pub status: u16,
    /// `campaign.business.id` of a 200.
    pub business_id: Option<BusinessId>,
    pub errors: Vec<ApiErrorEntry>,
}

/// No answer at all.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Other(String),
}

impl TransportError {
    /// Whether the request may have reached the Market (and used quota).
    pub fn may_have_arrived(&self) -> bool {
        !matches!(self, Self::Connect(_))
    }
}

pub struct MarketClient {
    http: awc::Client,
    base_url: String,
    timeout: Duration,
}

impl MarketClient {
    pub fn new(base_url: &str, timeout: Duration) -> Self {
        // A redirect is an answer, not a way on: followed, a 307 would carry
        // the message and the seller's Api-Key to wherever it points, and
        // its 200 would count as delivered (a 301 or 302 turns the POST
        // into a GET). The delivery is refused with the 3xx status instead.
        let http = awc::Client::builder()
            .disable_redirects()
            .timeout(timeout)
            .add_default_header((
                HEADER_INTEGRATION,
                concat!("chatbridge/", env!("CARGO_PKG_VERSION")),
            ))
            .finish();
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            timeout,
        }
    }

    /// `POST /v2/businesses/{businessId}/chats/message?chatId={chatId}`.
    pub async fn send_message(
        &self,
        api_key: &SecretString,
        business: BusinessId,
        chat: ChatId,
        text: &str,
    ) -> Result<MarketAnswer, TransportError> {
        self.post(
            api_key,
            &super::send_message_path(business.0, chat.0),
            serde_json::json!({ "message": text }),
        )
        .await
    }

    /// `POST /v2/businesses/{businessId}/chats/new` with the order or return
    /// as context: the Market answers with the chat, new or existing.
    pub async fn create_chat(
        &self,
        api_key: &SecretString,
        business: BusinessId,
        context: ChatContext,
    ) -> Result<MarketAnswer, TransportError> {
        self.post(
            api_key,
            &super::create_chat_path(business.0),
            serde_json::json!({ "context": { "type": context.kind.as_str(), "id": context.id } }),
        )
        .await
    }

    /// `GET /v2/campaigns/{campaignId}`: the answer's `campaign.business.id`
    /// is in [`CampaignAnswer::business_id`].
    pub async fn get_campaign(
        &self,
        api_key: &SecretString,
        campaign: i64,
    ) -> Result<CampaignAnswer, TransportError> {
        let url = format!("{}{}", self.base_url, super::campaign_path(campaign));
        let sent = self
            .http
            .get(url)
            .insert_header((HEADER_API_KEY, api_key.expose_secret()))
            .send()
            .await;
        let mut response = sent.map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let body = response
            .body()
            .limit(MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let errors = serde_json::from_value::<ApiResponse>(parsed.clone())
            .map(|r| r.errors)
            .unwrap_or_default();
        Ok(CampaignAnswer {
            status,
            business_id: parsed
                .pointer("/campaign/business/id")
                .and_then(serde_json::Value::as_i64)
                .filter(|&b| b >= 1)
                .map(BusinessId),
            errors,
        })
    }

    fn transport_error(&self, e: awc::error::SendRequestError) -> TransportError {
        match e {
            awc::error::SendRequestError::Timeout => TransportError::Timeout(self.timeout),
            awc::error::SendRequestError::Connect(e) => TransportError::Connect(e.to_string()),
            e => TransportError::Other(e.to_string()),
        }
    }

    async fn post(
        &self,
        api_key: &SecretString,
        path_and_query: &str,
        body: serde_json::Value,
    ) -> Result<MarketAnswer, TransportError> {
        let url = format!("{}{path_and_query}", self.base_url);
        let started = Instant::now();
        let sent = self
            .http
            .post(url)
            .insert_header((HEADER_API_KEY, api_key.expose_secret()))
            .send_json(&body)
            .await;
        let mut response = sent.map_err(|e| self.transport_error(e))?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let remaining = header(HEADER_REMAINING).and_then(|v| v.trim().parse().ok());
        let until = header(HEADER_UNTIL).and_then(|v| parse_until(&v));
        let status = response.status().as_u16();
        // A body we cannot read or parse still leaves the status to act on.
        let body = response
            .body()
            .limit(MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        let parsed = serde_json::from_slice::<ApiResponse>(&body).unwrap_or_default();
        Ok(MarketAnswer {
            status,
            errors: parsed.errors,
            remaining,
            until,
            latency: started.elapsed(),
            chat_id: parsed
                .result
                .and_then(|r| r.chat_id)
                .filter(|&c| c >= 1)
                .map(ChatId),
        })
    }
}

/// `X-RateLimit-Resource-Until` is an RFC 822 date.
pub fn parse_until(value: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc2822(value.trim())
        .ok()
        .map(|t| t.timestamp_millis())
}

pub fn format_until(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc2822())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_dates_round_trip() {
        let t = 1_795_000_000_000;
        assert_eq!(parse_until(&format_until(t)), Some(t));
        assert!(parse_until("Wed, 25 Nov 2026 13:00:00 GMT").is_some());
        assert_eq!(parse_until("soon"), None);
    }
}
