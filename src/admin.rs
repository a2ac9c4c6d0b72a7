//! `/admin`: look into and act on deliveries. Every call needs
//! `Authorization: Bearer <admin.token>` (compared in constant time); with
//! no token configured the whole API answers 404, off rather than open.

use actix_web::{web, HttpRequest, HttpResponse, Scope};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::api_error::ApiError;
use crate::app::AppState;
use crate::clock::to_rfc3339;
use crate::domain::DeliveryState;
use crate::render::EventMeta;
use crate::store::{DeliveryFilter, RenderedMessage};

pub fn scope() -> Scope {
    web::scope("/admin")
        .route("/deliveries", web::get().to(list_deliveries))
        .route("/deliveries/{id}", web::get().to(show_delivery))
        .route("/deliveries/{id}/retry", web::post().to(retry_delivery))
        .route("/deliveries/{id}/cancel", web::post().to(cancel_delivery))
        .route("/events/{id}", web::get().to(show_event))
        .route("/queue", web::get().to(queue))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    business_id: Option<i64>,
    chat_id: Option<i64>,
    route: Option<String>,
    source: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after: Option<i64>,
    limit: Option<usize>,
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
    let q = query.into_inner();
    let delivery_state = q
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
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let filter = DeliveryFilter {
        state: delivery_state,
        business_id: q.business_id,
        chat_id: q.chat_id,
        route: q.route,
        source: q.source,
        since: parse_time("since", &q.since)?,
        until: parse_time("until", &q.until)?,
        after_id: q.after,
        limit,
    };
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

/// Re-renders with the templates in force now and queues the delivery again.
async fn retry_delivery(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let id = id.into_inner();
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
    let Some(route) = pipeline
        .routes
        .routes
        .iter()
        .find(|r| r.name == delivery.route)
    else {
        return Err(ApiError::new(
            409,
            "conflict",
            format!("route {:?} is no longer in routes.toml", delivery.route),
        ));
    };
    let payload: Value = serde_json::from_str(&event.payload).map_err(ApiError::internal)?;
    let meta = EventMeta {
        source: event.source.clone(),
        event_type: event.event_type.clone(),
        id: event.external_id.clone(),
        received_at: to_rfc3339(event.received_at),
    };
    let now = state.clock.now_ms();
    let context = crate::render::event_context(&payload, &meta);
    match pipeline.renderer.render(route, &context) {
        Ok(rendered) => {
            let text = rendered.text.into_string();
            let text_changed = delivery.text.as_deref() != Some(text.as_str());
            state
                .store
                .requeue(
                    id,
                    RenderedMessage {
                        business_id: rendered.business_id,
                        chat_id: rendered.chat_id,
                        text: text.clone(),
                    },
                    now,
                )
                .await?;
            state.wake.notify_one();
            Ok(HttpResponse::Ok().json(json!({
                "id": id, "state": "queued", "text": text, "text_changed": text_changed
            })))
        }
        Err(reason) => {
            state.store.mark_failed(id, reason.clone(), now).await?;
            Ok(HttpResponse::UnprocessableEntity().json(json!({
                "error": {"code": "render_failed", "message": reason},
                "id": id, "state": "failed"
            })))
        }
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

async fn queue(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize(&state, &req)?;
    let summary = state.store.queue_summary().await?;
    Ok(HttpResponse::Ok().json(json!({ "businesses": summary })))
}
