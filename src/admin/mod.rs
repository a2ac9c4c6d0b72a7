//! `/admin`: look into and act on deliveries. Every call needs
//! `Authorization: Bearer <admin.token>` (compared in constant time); with
//! no token configured the whole API answers 404, off rather than open.
//! Handlers take the [`Admin`] extractor, which checks the token once for
//! all of them and hands over the shared state.

pub mod cli;
mod queue;
mod retry;

pub(crate) use queue::{queue_overview, BusinessOverview};
pub(crate) use retry::{retry_by_filter, retry_one, Retried};

use std::future::{ready, Ready};
use std::ops::Deref;

use actix_web::{web, FromRequest, HttpRequest, HttpResponse, Scope};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::api_error::ApiError;
use crate::clock::to_rfc3339;
use crate::domain::DeliveryState;
use crate::state::AppState;
use crate::store::DeliveryFilter;

/// The error codes a refused token gets: the CLI and the console tell an
/// absent token from a wrong one by them.
pub const TOKEN_MISSING: &str = "token_missing";
pub const TOKEN_NOT_ACCEPTED: &str = "token_not_accepted";

pub fn scope() -> Scope {
    web::scope("/admin")
        .route("/deliveries", web::get().to(list_deliveries))
        .route("/deliveries/retry", web::post().to(retry::retry_matching))
        .route("/deliveries/{id}", web::get().to(show_delivery))
        .route(
            "/deliveries/{id}/retry",
            web::post().to(retry::retry_delivery),
        )
        .route("/deliveries/{id}/cancel", web::post().to(cancel_delivery))
        .route("/events/{id}", web::get().to(show_event))
        .route("/events", web::get().to(find_event))
        .route("/queue", web::get().to(queue::queue))
        .route("/reload", web::post().to(reload_config))
        .route("/openapi.json", web::get().to(openapi))
}

/// An authorised admin request: extracting it checks the bearer token, so
/// a handler that takes it cannot forget to. Derefs to the shared state.
pub struct Admin(web::Data<AppState>);

impl Deref for Admin {
    type Target = AppState;
    fn deref(&self) -> &AppState {
        &self.0
    }
}

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
            return ready(Err(ApiError::internal("the admin API has no state")));
        };
        ready(authorize(&state, req).map(|()| Admin(state)))
    }
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
        .filter(|v| !v.is_empty());
    match presented {
        None => Err(ApiError::new(
            401,
            TOKEN_MISSING,
            "no admin token was sent: send the header Authorization: Bearer <admin.token>",
        )),
        Some(p) if bool::from(token.expose_secret().as_bytes().ct_eq(p.as_bytes())) => Ok(()),
        Some(_) => Err(ApiError::new(
            401,
            TOKEN_NOT_ACCEPTED,
            "the admin token was not accepted: it differs from admin.token (CHATBRIDGE__ADMIN__TOKEN) of this instance",
        )),
    }
}

/// The delivery filter as the API takes it (query string or JSON body);
/// the console parses its form through this too.
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
    state: Admin,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let filter = query.to_filter()?;
    let limit = filter.limit;
    let rows = state.store.list_deliveries(filter).await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(HttpResponse::Ok().json(json!({ "deliveries": rows, "next_after": next })))
}

async fn show_delivery(state: Admin, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
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

fn event_json(e: &crate::store::StoredEvent) -> Value {
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

async fn show_event(state: Admin, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
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

async fn reload_config(state: Admin) -> Result<HttpResponse, ApiError> {
    match crate::reload::reload(&state, "admin API").await {
        Ok(applied) => Ok(HttpResponse::Ok().json(applied)),
        Err(problems) => Ok(HttpResponse::UnprocessableEntity().json(json!({
            "error": {"code": "config_refused", "message": "the new configuration was refused; the previous one stays"},
            "problems": problems,
            "config_version": state.pipeline.load().version,
        }))),
    }
}

async fn cancel_delivery(state: Admin, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
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
async fn find_event(state: Admin, query: web::Query<EventQuery>) -> Result<HttpResponse, ApiError> {
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
