//! `/admin`: look into and act on deliveries. Every call needs
//! `Authorization: Bearer <admin.token>` (compared in constant time); with
//! no token configured the whole API answers 404, off rather than open.

pub mod cli;

use actix_web::{web, HttpRequest, HttpResponse, Scope};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::api_error::ApiError;
use crate::clock::to_rfc3339;
use crate::domain::DeliveryState;
use crate::state::AppState;
use crate::store::{DeliveryFilter, RenderedMessage};

pub fn scope() -> Scope {
    web::scope("/admin")
        .route("/deliveries", web::get().to(list_deliveries))
        .route("/deliveries/retry", web::post().to(retry_matching))
        .route("/deliveries/{id}", web::get().to(show_delivery))
        .route("/deliveries/{id}/retry", web::post().to(retry_delivery))
        .route("/deliveries/{id}/cancel", web::post().to(cancel_delivery))
        .route("/events/{id}", web::get().to(show_event))
        .route("/events", web::get().to(find_event))
        .route("/queue", web::get().to(queue))
        .route("/reload", web::post().to(reload_config))
        .route("/openapi.json", web::get().to(openapi))
}

fn authorize(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let pipeline = state.pipeline.load();
    let Some(token) = pipeline
        .settings
        .admin
        .token
        .as_ref()
        .filter(|t| !t.expose_secret().is_empty())
    else {
        return Err(ApiError::not_found(
            "the admin API is off: set admin.token (CHATBRIDGE__ADMIN__TOKEN)",
        ));
    };
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(token.expose_secret().as_bytes().ct_eq(presented.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "unauthorized",
            "send Authorization: Bearer <admin.token>",
        ))
    }
}

/// The delivery filter as the API takes it (query string or JSON body);
/// the console parses its form through this too, so both read a filter
/// the same way.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    state: Option<String>,
    business_id: Option<i64>,
    chat_id: Option<i64>,
    order_id: Option<i64>,
    return_id: Option<i64>,
    route: Option<String>,
    source: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after: Option<i64>,
    limit: Option<usize>,
}

impl ListQuery {
    pub(crate) fn to_filter(&self) -> Result<DeliveryFilter, ApiError> {
        let state = self
            .state
            .as_deref()
            .map(|s| {
                DeliveryState::parse(s).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unknown state {s:?}; one of queued, sending, delivered, held, dead, failed, cancelled"
                    ))
                })
            })
            .transpose()?;
        Ok(DeliveryFilter {
            state,
            business_id: self.business_id,
            chat_id: self.chat_id,
            order_id: self.order_id,
            return_id: self.return_id,
            route: self.route.clone(),
            source: self.source.clone(),
            since: parse_time("since", &self.since)?,
            until: parse_time("until", &self.until)?,
            after_id: self.after,
            limit: self.limit.unwrap_or(100).clamp(1, 1000),
        })
    }
}

fn parse_time(field: &str, value: &Option<String>) -> Result<Option<i64>, ApiError> {
    value
        .as_deref()
        .map(|v| {
            chrono::DateTime::parse_from_rfc3339(v)
                .map(|t| t.timestamp_millis())
                .map_err(|_| {
                    ApiError::bad_request(format!(
                        "{field} must be an RFC 3339 time like 2026-11-25T10:00:00Z"
                    ))
                })
        })
        .transpose()
}

async fn list_deliveries(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let filter = query.to_filter()?;
    let limit = filter.limit;
    let rows = state.store.list_deliveries(filter).await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(HttpResponse::Ok().json(json!({ "deliveries": rows, "next_after": next })))
}

async fn show_delivery(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let id = id.into_inner();
    let (delivery, attempts) = state
        .store
        .delivery(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no delivery {id}")))?;
    let event = state.store.event(delivery.event_id).await?;
    Ok(HttpResponse::Ok().json(json!({
        "delivery": delivery,
        "attempts": attempts,
        "event": event.map(|e| event_json(&e)),
    })))
}

pub(crate) fn event_json(e: &crate::store::StoredEvent) -> Value {
    json!({
        "id": e.id,
        "source": e.source,
        "event_id": e.external_id,
        "type": e.event_type,
        "received_at": to_rfc3339(e.received_at),
        "payload": serde_json::from_str::<Value>(&e.payload).unwrap_or(Value::Null),
        "deliveries": e.deliveries,
    })
}

async fn show_event(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let id = id.into_inner();
    let event = state
        .store
        .event(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no event {id}")))?;
    Ok(HttpResponse::Ok().json(event_json(&event)))
}

/// The OpenAPI description of this API; public, as it holds no data.
async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(include_str!("openapi.json"))
}

/// What an operator's retry did to one delivery.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Retried {
    pub id: i64,
    pub state: DeliveryState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The current templates render a different text than was stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_changed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Re-renders one delivery with the configuration in force now and queues
/// it again; a delivery that still does not render stays `failed`.
pub(crate) async fn retry_one(state: &AppState, id: i64) -> Result<Retried, ApiError> {
    let (delivery, _) = state
        .store
        .delivery(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no delivery {id}")))?;
    if !delivery.state.is_retryable_by_operator() {
        return Err(ApiError::new(
            409,
            "conflict",
            format!(
                "delivery {id} is {}; only failed, dead or cancelled deliveries can be retried",
                delivery.state
            ),
        ));
    }
    let event = state
        .store
        .event(delivery.event_id)
        .await?
        .ok_or_else(|| ApiError::internal(format!("delivery {id} has no event")))?;
    let pipeline = state.pipeline.load_full();
    let Some(rendered) = pipeline.render_stored(&event, &delivery.route) else {
        return Err(ApiError::new(
            409,
            "conflict",
            format!("route {:?} is no longer in routes.toml", delivery.route),
        ));
    };
    let now = state.clock.now_ms();
    match rendered {
        Ok(rendered) => {
            let text = rendered.text.into_string();
            let text_changed = delivery.text.as_deref() != Some(text.as_str());
            let message = RenderedMessage {
                business_id: rendered.business_id,
                target: rendered.target,
                text: text.clone(),
            };
            state.store.requeue(id, message, now).await?;
            state.wake.notify_one();
            tracing::info!(
                delivery = id,
                text_changed,
                "delivery queued again by an operator"
            );
            Ok(Retried {
                id,
                state: DeliveryState::Queued,
                text: Some(text),
                text_changed: Some(text_changed),
                error: None,
            })
        }
        Err(reason) => {
            state.store.mark_failed(id, reason.clone(), now).await?;
            Ok(Retried {
                id,
                state: DeliveryState::Failed,
                text: None,
                text_changed: None,
                error: Some(reason),
            })
        }
    }
}

async fn retry_delivery(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let retried = retry_one(&state, id.into_inner()).await?;
    Ok(match &retried.error {
        None => HttpResponse::Ok().json(&retried),
        Some(reason) => HttpResponse::UnprocessableEntity().json(json!({
            "error": {"code": "render_failed", "message": reason},
            "id": retried.id, "state": "failed"
        })),
    })
}

/// `POST /admin/deliveries/retry` with a filter: every failed, dead or
/// cancelled delivery that matches (at most `limit`, default 100).
async fn retry_matching(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let outcome = retry_by_filter(&state, body.into_inner(), false).await?;
    Ok(HttpResponse::Ok().json(json!({
        "queued": outcome.queued,
        "still_failing": outcome.deliveries.len() - outcome.queued,
        "deliveries": outcome.deliveries,
    })))
}

/// What a retry by filter did, or with `dry_run` would do.
pub(crate) struct RetryByFilter {
    /// Queued again (with `dry_run`: the deliveries that would be tried).
    pub queued: usize,
    pub deliveries: Vec<Retried>,
}

/// Retries every failed, dead or cancelled delivery the filter selects (at
/// most its `limit`). With `dry_run`, changes nothing and lists what would
/// be tried, each in its current state: the count an operator confirms.
pub(crate) async fn retry_by_filter(
    state: &AppState,
    query: ListQuery,
    dry_run: bool,
) -> Result<RetryByFilter, ApiError> {
    let mut filter = query.to_filter()?;
    let states = match filter.state {
        Some(s) if s.is_retryable_by_operator() => vec![s],
        Some(s) => {
            return Err(ApiError::bad_request(format!(
                "{s} deliveries cannot be retried; filter on failed, dead or cancelled"
            )))
        }
        None => vec![
            DeliveryState::Failed,
            DeliveryState::Dead,
            DeliveryState::Cancelled,
        ],
    };
    let limit = filter.limit;
    let mut results = Vec::new();
    for s in states {
        filter.state = Some(s);
        filter.limit = limit - results.len();
        if filter.limit == 0 {
            break;
        }
        for row in state.store.list_deliveries(filter.clone()).await? {
            if dry_run {
                results.push(Retried {
                    id: row.id,
                    state: row.state,
                    text: row.text,
                    text_changed: None,
                    error: None,
                });
                continue;
            }
            // One delivery that cannot be retried must not hide the others.
            results.push(retry_one(state, row.id).await.unwrap_or_else(|e| Retried {
                id: row.id,
                state: row.state,
                text: None,
                text_changed: None,
                error: Some(e.message),
            }));
        }
    }
    Ok(RetryByFilter {
        queued: results.iter().filter(|r| r.error.is_none()).count(),
        deliveries: results,
    })
}

async fn reload_config(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    match crate::reload::reload(&state, "admin API").await {
        Ok(applied) => Ok(HttpResponse::Ok().json(applied)),
        Err(problems) => Ok(HttpResponse::UnprocessableEntity().json(json!({
            "error": {"code": "config_refused", "message": "the new configuration was refused; the previous one stays"},
            "problems": problems,
            "config_version": state.pipeline.load().version,
        }))),
    }
}

async fn cancel_delivery(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let id = id.into_inner();
    state.store.cancel(id, state.clock.now_ms()).await?;
    Ok(HttpResponse::Ok().json(json!({"id": id, "state": "cancelled"})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    source: String,
    event_id: String,
}

/// `GET /admin/events?source=oms&event_id=A-1`: an event by the id its source gave it.
async fn find_event(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<EventQuery>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let EventQuery { source, event_id } = query.into_inner();
    let event = state
        .store
        .event_by_source_id(source.clone(), event_id.clone())
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("no event {event_id:?} from source {source:?}"))
        })?;
    Ok(HttpResponse::Ok().json(event_json(&event)))
}

/// Per business: what waits, what is stuck, the quota, and how long the
/// backlog takes to drain at that quota.
async fn queue(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let businesses = queue_overview(&state).await?;
    Ok(HttpResponse::Ok().json(json!({ "businesses": businesses })))
}

/// One business's line in `GET /admin/queue` and the console's overview.
#[derive(Debug, serde::Serialize)]
pub(crate) struct BusinessOverview {
    pub business_id: i64,
    pub queued: i64,
    pub sending: i64,
    pub held: i64,
    pub dead: i64,
    pub failed: i64,
    pub oldest_queued_at: Option<String>,
    pub sent_in_window: usize,
    pub quota_limit: i64,
    pub quota_window_secs: i64,
    pub quota_left: i64,
    pub drain_estimate_secs: i64,
    /// When the oldest send in the window leaves it (the quota grows by one).
    #[serde(skip)]
    pub quota_frees_at: Option<crate::clock::Millis>,
}

pub(crate) async fn queue_overview(state: &AppState) -> Result<Vec<BusinessOverview>, ApiError> {
    let now = state.clock.now_ms();
    let pipeline = state.pipeline.load_full();
    let mut businesses = Vec::new();
    for b in state.store.queue_summary().await? {
        let limits = pipeline
            .settings
            .market
            .limits_for(crate::domain::BusinessId(b.business_id));
        let window_ms = limits.quota_window.as_millis() as i64;
        let sent = state
            .store
            .calls_since(
                crate::domain::BusinessId(b.business_id),
                crate::domain::MarketMethod::SendMessage,
                now - window_ms,
            )
            .await?;
        let limit = i64::from(limits.hourly_limit);
        let quota_left = (limit - sent.len() as i64).max(0);
        let backlog = b.queued + b.held + b.sending;
        // What the quota left covers goes now; the rest a full window per `limit`.
        let drain_secs = if backlog <= quota_left {
            0
        } else {
            let windows = (backlog - quota_left + limit - 1) / limit;
            let first_free = sent
                .first()
                .map(|t| t + window_ms - now)
                .unwrap_or(0)
                .max(0);
            (first_free + (windows - 1) * window_ms) / 1000
        };
        businesses.push(BusinessOverview {
            business_id: b.business_id,
            queued: b.queued,
            sending: b.sending,
            held: b.held,
            dead: b.dead,
            failed: b.failed,
            oldest_queued_at: b.oldest_queued_at.map(to_rfc3339),
            sent_in_window: sent.len(),
            quota_limit: limit,
            quota_window_secs: window_ms / 1000,
            quota_left,
            drain_estimate_secs: drain_secs,
            quota_frees_at: sent.first().map(|t| t + window_ms),
        });
    }
    Ok(businesses)
}
