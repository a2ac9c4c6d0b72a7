//! Retrying deliveries: one by id, or many by a filter. Many needs a filter
//! or `"all": true` (a bare request must not resend what an operator
//! stopped), a cancelled delivery is only retried when asked for by state or
//! id, and `"dry_run": true` shows what would be retried without touching
//! anything (the CLI's preview and, later, the console's, in one call).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::{Admin, ListQuery};
use crate::api_error::ApiError;
use crate::domain::DeliveryState;
use crate::state::AppState;
use crate::store::{DeliveryRow, RenderedMessage};

/// How many deliveries a dry run shows.
const SAMPLE: usize = 10;

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

pub(super) async fn retry_delivery(
    state: Admin,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let retried = retry_one(&state, id.into_inner()).await?;
    Ok(match &retried.error {
        None => HttpResponse::Ok().json(&retried),
        Some(reason) => HttpResponse::UnprocessableEntity().json(json!({
            "error": {"code": "render_failed", "message": reason},
            "id": retried.id, "state": "failed"
        })),
    })
}

/// `POST /admin/deliveries/retry`: which deliveries, and whether to act.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryRequest {
    state: Option<String>,
    business_id: Option<i64>,
    chat_id: Option<i64>,
    order_id: Option<i64>,
    return_id: Option<i64>,
    route: Option<String>,
    source: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    /// No filter: every failed and dead delivery (cancelled ones only with
    /// `state: "cancelled"`).
    #[serde(default)]
    all: bool,
    /// Count and show what would be retried; change nothing.
    #[serde(default)]
    dry_run: bool,
}

impl RetryRequest {
    fn has_filter(&self) -> bool {
        self.state.is_some()
            || self.business_id.is_some()
            || self.chat_id.is_some()
            || self.order_id.is_some()
            || self.return_id.is_some()
            || self.route.is_some()
            || self.source.is_some()
            || self.since.is_some()
            || self.until.is_some()
    }

    fn list_query(&self) -> ListQuery {
        ListQuery {
            state: self.state.clone(),
            business_id: self.business_id,
            chat_id: self.chat_id,
            order_id: self.order_id,
            return_id: self.return_id,
            route: self.route.clone(),
            source: self.source.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            after: None,
            limit: self.limit,
        }
    }
}

/// Every failed or dead delivery that matches (cancelled ones only when
/// the filter names that state), at most `limit` (default 100); with
/// `dry_run`, what would be retried.
pub(super) async fn retry_matching(
    state: Admin,
    body: web::Json<RetryRequest>,
) -> Result<HttpResponse, ApiError> {
    let request = body.into_inner();
    if !request.has_filter() && !request.all {
        return Err(ApiError::bad_request(
            "say which deliveries to retry: a filter (state, business_id, chat_id, order_id, return_id, route, source, since, until) or \"all\": true for every failed and dead one",
        ));
    }
    let (states, matched, more) = matching(&state, &request.list_query()).await?;
    let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    if request.dry_run {
        return Ok(HttpResponse::Ok().json(json!({
            "dry_run": true,
            "states": states,
            "matched": matched.len(),
            "more": more,
            "sample": &matched[..matched.len().min(SAMPLE)],
        })));
    }
    let results = retry_rows(&state, &matched).await;
    let queued = results.iter().filter(|r| r.error.is_none()).count();
    Ok(HttpResponse::Ok().json(json!({
        "dry_run": false,
        "states": states,
        "matched": results.len(),
        "more": more,
        "queued": queued,
        "still_failing": results.len() - queued,
        "deliveries": results,
    })))
}

/// The deliveries a filter selects for a retry: its state, or failed and
/// dead (cancelled ones only when the filter names that state); at most
/// its limit, and whether the limit was reached.
async fn matching(
    state: &AppState,
    query: &ListQuery,
) -> Result<(Vec<DeliveryState>, Vec<DeliveryRow>, bool), ApiError> {
    let mut filter = query.to_filter()?;
    let states = match filter.state {
        Some(s) if s.is_retryable_by_operator() => vec![s],
        Some(s) => {
            return Err(ApiError::bad_request(format!(
                "{s} deliveries cannot be retried; filter on failed, dead or cancelled"
            )))
        }
        // An operator cancelled those on purpose: only by name.
        None => vec![DeliveryState::Failed, DeliveryState::Dead],
    };
    let limit = filter.limit;
    let mut matched = Vec::new();
    for s in &states {
        filter.state = Some(*s);
        filter.limit = limit - matched.len();
        if filter.limit == 0 {
            break;
        }
        matched.extend(state.store.list_deliveries(filter.clone()).await?);
    }
    let more = matched.len() == limit;
    Ok((states, matched, more))
}

async fn retry_rows(state: &AppState, rows: &[DeliveryRow]) -> Vec<Retried> {
    let mut results = Vec::new();
    for row in rows {
        // One delivery that cannot be retried must not hide the others.
        results.push(retry_one(state, row.id).await.unwrap_or_else(|e| Retried {
            id: row.id,
            state: row.state,
            text: None,
            text_changed: None,
            error: Some(e.message),
        }));
    }
    results
}

/// What a retry by filter did, or with `dry_run` would do (the console's
/// bulk retry, same rules as the API).
pub(crate) struct RetryByFilter {
    /// Queued again (with `dry_run`: none).
    pub queued: usize,
    pub deliveries: Vec<Retried>,
}

pub(crate) async fn retry_by_filter(
    state: &AppState,
    query: ListQuery,
    dry_run: bool,
) -> Result<RetryByFilter, ApiError> {
    let (_, matched, _) = matching(state, &query).await?;
    if dry_run {
        return Ok(RetryByFilter {
            queued: 0,
            deliveries: matched
                .into_iter()
                .map(|row| Retried {
                    id: row.id,
                    state: row.state,
                    text: row.text,
                    text_changed: None,
                    error: None,
                })
                .collect(),
        });
    }
    let deliveries = retry_rows(state, &matched).await;
    Ok(RetryByFilter {
        queued: deliveries.iter().filter(|r| r.error.is_none()).count(),
        deliveries,
    })
}
