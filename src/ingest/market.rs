//! `POST /hooks/{source}/notification`: the Market's push notifications
//! (`notifications.openapi.yaml`) for a source of `kind = "market"`.
//! Checks, in order: unknown source 404, caller outside `allow_from` 403
//! (behind `server.trusted_proxies`, the right-most untrusted
//! `X-Forwarded-For` hop), body too large 413, not JSON 415, malformed 400
//! `WRONG_EVENT_FORMAT` (not JSON, no `notificationType`, a known type
//! without a field the spec requires). `PING` is answered at once, without
//! the store. Every other notification is answered `200
//! {"version","name","time"}` only once durably stored; our own failure
//! (a store outage, a Market we cannot ask for a campaign's business) is
//! `500 UNKNOWN`, which the Market retries.
//!
//! Notifications carry no id: the event id is the *repeat key* (type, the
//! order / return / chat / message ids and the status fields, never the
//! time), so a repeat creates nothing and answers 200. Status
//! notifications carry their time, and the store sends nothing for one
//! older than what it already holds about the same order or return.
//!
//! Order and return notifications name a campaign: its business comes from
//! `[market.campaigns]`, else the store, else `GET /v2/campaigns/{id}`
//! (remembered for good), before answering.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{deliveries_of, failure_reasons, note_outcome, parse_event, read_body, require_json};
use crate::api_error::ApiError;
use crate::clock::{to_rfc3339, Millis};
use crate::domain::BusinessId;
use crate::market::client::MarketClient;
use crate::pipeline::{hex, Pipeline};
use crate::render::EventMeta;
use crate::settings::{SourceKind, SourceSettings};
use crate::state::AppState;
use crate::store::{EventOrdering, Inserted, NewEvent, RenderFailure};

/// The name we answer the Market with.
const INTEGRATION_NAME: &str = "chatbridge";

/// What a worker needs to ask the Market for a campaign's business: its own
/// awc client (`!Send`, so one per worker thread, made in the server's
/// factory) and the per-campaign locks all workers share, so concurrent
/// notifications of a new campaign make one call.
pub struct CampaignLookup {
    client: MarketClient,
    locks: CampaignLocks,
}

/// One lock per campaign being looked up, shared by every worker.
#[derive(Clone, Default)]
pub struct CampaignLocks(Arc<Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>>);

impl CampaignLookup {
    pub fn new(settings: &crate::settings::MarketSettings, locks: CampaignLocks) -> Self {
        Self {
            client: MarketClient::new(
                &settings.base_url,
                std::time::Duration::from_secs(settings.request_timeout_secs),
            ),
            locks,
        }
    }
}

pub async fn receive(
    state: web::Data<AppState>,
    lookup: web::Data<CampaignLookup>,
    req: HttpRequest,
    source: web::Path<String>,
    payload: web::Payload,
) -> HttpResponse {
    let pipeline = state.pipeline.load_full();
    let source = source.into_inner();
    let result = accept(&state, &lookup, &pipeline, &req, &source, payload).await;
    note_outcome(
        &state,
        &pipeline,
        &req,
        &source,
        result.as_ref().map(|(_, o)| *o),
    );
    match result {
        Ok((response, _)) => response,
        Err(e) => market_error(&e),
    }
}

/// The spec's error body, `{"error":{"type","message"}}`, with our code
/// beside the type. The spec knows 400 and 500 for our own failures: an
/// unavailable store (503 elsewhere) is a 500 here, which the Market retries.
fn market_error(e: &ApiError) -> HttpResponse {
    let kind = match e.status.as_u16() {
        400 | 413 | 415 => "WRONG_EVENT_FORMAT",
        _ => "UNKNOWN",
    };
    let status = match e.status.as_u16() {
        503 => actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
        _ => e.status,
    };
    HttpResponse::build(status).json(json!({
        "error": {"type": kind, "code": e.code, "message": e.message}
    }))
}

fn success(now: Millis) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "name": INTEGRATION_NAME,
        "time": to_rfc3339(now),
    }))
}

async fn accept(
    state: &AppState,
    lookup: &CampaignLookup,
    pipeline: &Pipeline,
    req: &HttpRequest,
    source: &str,
    payload: web::Payload,
) -> Result<(HttpResponse, &'static str), ApiError> {
    let settings = &pipeline.settings;
    let Some(source_settings) = settings.sources.get(source) else {
        return Err(ApiError::new(
            404,
            "unknown_source",
            format!("no source {source:?} is configured"),
        ));
    };
    if source_settings.kind != SourceKind::Market {
        return Err(ApiError::new(
            404,
            "wrong_path",
            format!(
                "source {source:?} is a webhook source: POST its events to /hooks/{source}; \
                 /notification is for sources of kind = \"market\""
            ),
        ));
    }
    check_caller(settings, source, source_settings, req)?;
    let body = read_body(pipeline, req, payload).await?;
    require_json(req, "notification")?;
    let parsed = parse_event(source_settings, &body, None, settings.server.max_json_depth)?;
    let now = state.clock.now_ms();
    // The Market allows PING one second: nothing slow, nothing stored.
    if parsed.event_type == "PING" {
        return Ok((success(now), "ping"));
    }
    let notification = Notification::read(&parsed.event_type, &parsed.payload)?;

    let business = match (notification.business, notification.campaign) {
        (Some(b), _) => Ok(b),
        (None, Some(campaign)) => resolve_campaign(state, lookup, pipeline, campaign).await?,
        (None, None) => Err("the notification names neither a business nor a campaign".into()),
    };
    let meta = EventMeta {
        source: source.to_owned(),
        event_type: parsed.event_type.clone(),
        id: notification.repeat_key.clone(),
        received_at: to_rfc3339(now),
        business_id: business.as_ref().ok().map(|b| b.0),
    };
    let mut deliveries = deliveries_of(pipeline.plan(&parsed.payload, &meta));
    if let Err(why) = &business {
        // Stored all the same, so nothing is lost: once the operator says
        // whose campaign it is, a retry sends it.
        for d in &mut deliveries {
            let target = match &d.rendered {
                Ok(m) => Some(m.target),
                Err(f) => f.target,
            };
            d.rendered = Err(RenderFailure {
                reason: why.clone(),
                business_id: None,
                target,
            });
        }
    }
    let reasons = failure_reasons(&deliveries);
    let wake = super::needs_round(state, &deliveries, now);
    let inserted = state
        .store
        .insert_event(NewEvent {
            source: source.to_owned(),
            external_id: notification.repeat_key,
            event_type: parsed.event_type,
            payload: String::from_utf8_lossy(&body).into_owned(),
            received_at: now,
            deliveries,
            business_id: business.ok(),
            ordering: notification.ordering,
        })
        .await?;
    Ok(match inserted {
        Inserted::New(stored) => {
            super::after_commit(state, req, &stored, &reasons, wake);
            (success(now), "accepted")
        }
        Inserted::Duplicate(stored) => {
            tracing::debug!(
                source = %stored.source,
                event_id = %stored.external_id,
                "notification repeats a stored one; nothing new stored"
            );
            (success(now), "duplicate")
        }
    })
}

/// 403 unless the caller is in `allow_from` (or the source is `insecure`).
fn check_caller(
    settings: &crate::settings::Settings,
    source: &str,
    source_settings: &SourceSettings,
    req: &HttpRequest,
) -> Result<(), ApiError> {
    let Some(peer) = req.peer_addr().map(|p| p.ip()) else {
        return Err(ApiError::new(
            403,
            "forbidden",
            "the caller's address is unknown",
        ));
    };
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let client = settings.server.client_ip(peer, forwarded);
    if source_settings.allows(client) {
        return Ok(());
    }
    Err(ApiError::new(
        403,
        "forbidden",
        format!(
            "{client} is not in sources.{source}.allow_from; the Market calls from its own ranges \
             (behind a reverse proxy, list the proxy in server.trusted_proxies)"
        ),
    ))
}

/// Resolves a campaign's business. `Ok(Err(reason))`: it cannot be resolved
/// and asking again will not help (the event is stored, its deliveries
/// fail with the reason); `Err`: try later (500, the Market retries).
async fn resolve_campaign(
    state: &AppState,
    lookup: &CampaignLookup,
    pipeline: &Pipeline,
    campaign: i64,
) -> Result<Result<BusinessId, String>, ApiError> {
    if let Some(b) = pipeline.settings.market.configured_campaign(campaign) {
        return Ok(Ok(b));
    }
    if let Some(b) = state.store.campaign_business(campaign).await? {
        return Ok(Ok(b));
    }
    let configure = format!(
        "add \"{campaign}\" = <business id> under [market.campaigns] in {}, then retry this delivery",
        pipeline.settings.settings_file().display()
    );
    let Some(key) = pipeline
        .settings
        .market
        .api_key
        .clone()
        .filter(|k| !k.expose_secret().is_empty())
    else {
        return Ok(Err(format!(
            "campaign {campaign} is not in [market.campaigns] and market.api_key is not set, so its business is unknown; {configure}"
        )));
    };
    let gate = {
        let mut locks = lookup.locks.0.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(campaign).or_default().clone()
    };
    let _one_at_a_time = gate.lock().await;
    // Another request may have learnt it while this one waited.
    if let Some(b) = state.store.campaign_business(campaign).await? {
        return Ok(Ok(b));
    }
    let answer = lookup
        .client
        .get_campaign(&key, campaign)
        .await
        .map_err(|e| {
            tracing::error!(campaign, error = %e, "cannot ask the Market for a campaign's business; answering 500 so the Market retries");
            ApiError::new(500, "market_unreachable", format!("cannot ask the Market for campaign {campaign}: {e}"))
        })?;
    match (answer.status, answer.business_id) {
        (200, Some(business)) => {
            state
                .store
                .remember_campaign(campaign, business, state.clock.now_ms())
                .await?;
            tracing::info!(campaign, business = business.0, "learnt a campaign's business from the Market");
            Ok(Ok(business))
        }
        (404, _) => Ok(Err(format!(
            "the Market says campaign {campaign} does not exist (GET /v2/campaigns/{campaign} answered 404); {configure}"
        ))),
        (status, _) => {
            let codes: Vec<&str> = answer.errors.iter().map(|e| e.code.as_str()).collect();
            tracing::error!(campaign, status, codes = ?codes, "the Market did not name a campaign's business (401/403: check market.api_key); answering 500 so the Market retries");
            Err(ApiError::new(
                500,
                "campaign_lookup_failed",
                format!("GET /v2/campaigns/{campaign} answered {status}; try again later"),
            ))
        }
    }
}

/// What chatbridge reads from a notification beyond its type.
struct Notification {
    repeat_key: String,
    campaign: Option<i64>,
    business: Option<BusinessId>,
    ordering: Option<EventOrdering>,
}

#[derive(Clone, Copy, PartialEq)]
enum Field {
    /// An integer id (`minimum: 1` for campaign and business ids).
    Id,
    PositiveId,
    Text,
    Time,
    Array,
    Object,
}

/// The fields `notifications.openapi.yaml` requires of each known type
/// (besides `notificationType`). Unknown types have none: the Market adds
/// types over time, and they are stored like any other.
fn required_fields(kind: &str) -> &'static [(&'static str, Field)] {
    use Field::*;
    match kind {
        "ORDER_CREATED" => &[
            ("orderId", Id),
            ("campaignId", PositiveId),
            ("items", Array),
            ("createdAt", Time),
        ],
        "ORDER_CANCELLED" => &[
            ("orderId", Id),
            ("campaignId", PositiveId),
            ("items", Array),
            ("cancelledAt", Time),
        ],
        "ORDER_CANCELLATION_REQUEST" => &[
            ("orderId", Id),
            ("campaignId", PositiveId),
            ("requestedAt", Time),
        ],
        "ORDER_STATUS_UPDATED" => &[
            ("orderId", Id),
            ("campaignId", PositiveId),
            ("status", Text),
            ("substatus", Text),
            ("updatedAt", Time),
        ],
        "ORDER_RETURN_CREATED" => &[
            ("orderId", Id),
            ("returnId", Id),
            ("returnType", Text),
            ("campaignId", PositiveId),
            ("items", Array),
            ("createdAt", Time),
        ],
        "ORDER_RETURN_STATUS_UPDATED" => &[
            ("orderId", Id),
            ("returnId", Id),
            ("campaignId", PositiveId),
            ("statuses", Object),
            ("updatedAt", Time),
        ],
        "ORDER_UPDATED" => &[
            ("orderId", Id),
            ("campaignId", PositiveId),
            ("updateType", Text),
            ("updatedAt", Time),
        ],
        "GOODS_FEEDBACK_CREATED" => &[
            ("feedbackId", Id),
            ("businessId", PositiveId),
            ("createdAt", Time),
            ("publishedAt", Time),
        ],
        "GOODS_FEEDBACK_COMMENT_CREATED" => &[
            ("commentId", Id),
            ("businessId", PositiveId),
            ("createdAt", Time),
        ],
        "CHAT_CREATED" => &[
            ("chatId", Id),
            ("businessId", PositiveId),
            ("createdAt", Time),
        ],
        "CHAT_MESSAGE_SENT" => &[
            ("chatId", Id),
            ("messageId", Text),
            ("businessId", PositiveId),
            ("sentAt", Time),
        ],
        "CHAT_ARBITRAGE_STARTED" => &[
            ("chatId", Id),
            ("businessId", PositiveId),
            ("startedAt", Time),
        ],
        "CHAT_ARBITRAGE_FINISHED" => &[
            ("chatId", Id),
            ("businessId", PositiveId),
            ("finishedAt", Time),
        ],
        "QUESTION_CREATED" => &[
            ("questionId", Id),
            ("businessId", PositiveId),
            ("createdAt", Time),
        ],
        "QUESTION_ANSWER_CREATED" => &[
            ("answerId", Id),
            ("businessId", PositiveId),
            ("createdAt", Time),
        ],
        "QUESTION_COMMENT_CREATED" => &[
            ("answerId", Id),
            ("commentId", Id),
            ("businessId", PositiveId),
            ("createdAt", Time),
        ],
        _ => &[],
    }
}

/// The ids in a repeat key, in this order, when present.
const KEY_IDS: [&str; 8] = [
    "orderId",
    "returnId",
    "chatId",
    "messageId",
    "feedbackId",
    "commentId",
    "questionId",
    "answerId",
];
/// The status fields in a repeat key (JSON Pointers), when present.
const KEY_STATUSES: [&str; 5] = [
    "/status",
    "/substatus",
    "/statuses/refundStatus",
    "/statuses/shipmentStatus",
    "/updateType",
];

impl Notification {
    fn read(kind: &str, payload: &Value) -> Result<Self, ApiError> {
        let malformed = |what: String| ApiError::new(400, "malformed_notification", what);
        let required = required_fields(kind);
        for &(name, field) in required {
            let value = payload.get(name);
            let fits = match (field, value) {
                (_, None) => false,
                (Field::Id, Some(v)) => v.is_i64(),
                (Field::PositiveId, Some(v)) => v.as_i64().is_some_and(|n| n >= 1),
                (Field::Text, Some(v)) => v.as_str().is_some_and(|s| !s.is_empty()),
                (Field::Time, Some(v)) => v.as_str().and_then(parse_time).is_some(),
                (Field::Array, Some(v)) => v.is_array(),
                (Field::Object, Some(v)) => v.is_object(),
            };
            if !fits {
                let wanted = match field {
                    Field::Id => "an integer",
                    Field::PositiveId => "an integer of at least 1",
                    Field::Text => "a non-empty string",
                    Field::Time => {
                        "an ISO 8601 date-time with an offset, like 2017-11-21T00:00:00.213Z"
                    }
                    Field::Array => "an array",
                    Field::Object => "an object",
                };
                return Err(malformed(format!(
                    "{kind} needs {name}: {wanted} (notifications.openapi.yaml){}",
                    match value {
                        None => " — it is missing".to_owned(),
                        Some(v) => format!(" — got {}", short(v)),
                    }
                )));
            }
        }
        let repeat_key = if required.is_empty() {
            // Fields unknown: only an identical body is a repeat.
            format!(
                "{kind} sha256={}",
                hex(&Sha256::digest(payload.to_string().as_bytes())[..16])
            )
        } else {
            let mut key = kind.to_owned();
            for name in KEY_IDS {
                if let Some(v) = payload.get(name) {
                    key.push_str(&format!(" {name}={}", scalar(v)));
                }
            }
            for pointer in KEY_STATUSES {
                if let Some(v) = payload.pointer(pointer) {
                    key.push_str(&format!(" {}={}", &pointer[1..], scalar(v)));
                }
            }
            key
        };
        let time_of = |field: &str| {
            payload
                .get(field)
                .and_then(Value::as_str)
                .and_then(parse_time)
        };
        let ordering = match kind {
            "ORDER_STATUS_UPDATED" => Some(EventOrdering {
                subject: format!("order {}", payload["orderId"]),
                happened_at: time_of("updatedAt").unwrap_or_default(),
            }),
            "ORDER_RETURN_STATUS_UPDATED" => Some(EventOrdering {
                subject: format!("return {}", payload["returnId"]),
                happened_at: time_of("updatedAt").unwrap_or_default(),
            }),
            _ => None,
        };
        let positive = |field: &str| {
            payload
                .get(field)
                .and_then(Value::as_i64)
                .filter(|&n| n >= 1)
        };
        Ok(Self {
            repeat_key,
            campaign: positive("campaignId"),
            business: positive("businessId").map(BusinessId),
            ordering,
        })
    }
}

fn parse_time(text: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A value as an error message shows it: short, one line.
fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}
