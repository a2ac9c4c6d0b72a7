//! `GET /admin/queue`: per business, what waits and why, the quota, the
//! Market's pause and a drain estimate. Lists every business with anything
//! open or stuck in the store, and every business the dispatcher knows to
//! have used quota in the window, to be paused or to be held, so what
//! `/metrics` shows is never missing here.

use std::collections::BTreeSet;

use actix_web::HttpResponse;
use serde::Serialize;
use serde_json::json;

use super::Admin;
use crate::api_error::ApiError;
use crate::clock::{to_rfc3339, Millis};
use crate::dispatch::status::BusinessStatus;
use crate::domain::{BusinessId, MarketMethod};
use crate::state::AppState;
use crate::store::BusinessQueue;

pub(super) async fn queue(state: Admin) -> Result<HttpResponse, ApiError> {
    let businesses = queue_overview(&state).await?;
    Ok(HttpResponse::Ok().json(json!({ "businesses": businesses })))
}

/// One business in the queue view (the admin API's `BusinessQueue`; the
/// console's overview reads the same).
#[derive(Debug, Serialize)]
pub(crate) struct BusinessOverview {
    pub business_id: i64,
    pub queued: i64,
    pub sending: i64,
    pub held: i64,
    pub dead: i64,
    pub failed: i64,
    pub oldest_queued_at: Option<String>,
    pub waiting_for_chat_turn: i64,
    pub waiting_for_retry_time: i64,
    pub waiting_for_pause: i64,
    pub waiting_for_quota: i64,
    pub paused_until: Option<String>,
    pub pause_reason: Option<&'static str>,
    pub key_refused: bool,
    pub key_refused_reason: Option<String>,
    pub sent_in_window: usize,
    pub quota_limit: i64,
    pub quota_window_secs: i64,
    pub quota_left: i64,
    pub quota_next_free_at: Option<String>,
    /// `None` while the key is refused.
    pub drain_estimate_secs: Option<i64>,
    /// When the next quota slot frees, if none is left.
    #[serde(skip)]
    pub quota_frees_at: Option<Millis>,
}

pub(crate) async fn queue_overview(state: &AppState) -> Result<Vec<BusinessOverview>, ApiError> {
    let now = state.clock.now_ms();
    let pipeline = state.pipeline.load_full();
    let summary = state.store.queue_summary().await?;
    let dispatch = state.dispatch.snapshot();
    let ids: BTreeSet<i64> = summary
        .iter()
        .map(|b| b.business_id)
        .chain(
            dispatch
                .iter()
                .filter(|(_, s)| s.quota_used > 0 || s.paused_until.is_some() || s.held)
                .map(|(id, _)| id.0),
        )
        .collect();
    let mut businesses = Vec::new();
    for id in ids {
        let business = BusinessId(id);
        let counts = summary
            .iter()
            .find(|b| b.business_id == id)
            .cloned()
            .unwrap_or(BusinessQueue {
                business_id: id,
                ..BusinessQueue::default()
            });
        let limits = pipeline.settings.market.limits_for(business);
        let window_ms = limits.quota_window.as_millis() as Millis;
        let limit = i64::from(limits.hourly_limit);
        // The dispatcher's count is the one it obeys; the store's sends are
        // the fallback for a business it has not looked at since it started.
        let seen = dispatch.get(&business).cloned();
        let (used, next_free) = match &seen {
            Some(s) => (i64::from(s.quota_used), s.quota_next_free),
            None => {
                let sent = state
                    .store
                    .calls_since(business, MarketMethod::SendMessage, now - window_ms)
                    .await?;
                let next_free = (sent.len() as i64 >= limit)
                    .then(|| sent.first().map(|t| t + window_ms))
                    .flatten();
                (sent.len() as i64, next_free)
            }
        };
        let status = seen.unwrap_or_default();
        let waits = state.store.queue_waits(business, now).await?;
        let quota_left = (limit - used).max(0);
        let backlog = counts.queued + counts.sending;
        let estimate = drain_estimate(
            now, &status, &counts, backlog, quota_left, limit, window_ms, next_free,
        );
        let paused = status.paused_until.filter(|&u| u > now);
        // Of the queued ones that could go now (their turn in the chat and
        // their retry time reached): what holds them back.
        let ready = (counts.queued - waits.behind_chat - waits.not_yet_due).max(0);
        let waiting_for_pause = if paused.is_some() || status.held {
            ready
        } else {
            0
        };
        let waiting_for_quota = if waiting_for_pause == 0 {
            (ready - quota_left).max(0)
        } else {
            0
        };
        businesses.push(BusinessOverview {
            business_id: id,
            queued: counts.queued,
            sending: counts.sending,
            held: counts.held,
            dead: counts.dead,
            failed: counts.failed,
            oldest_queued_at: counts.oldest_queued_at.map(to_rfc3339),
            waiting_for_chat_turn: waits.behind_chat,
            waiting_for_retry_time: waits.not_yet_due,
            waiting_for_pause,
            waiting_for_quota,
            paused_until: paused.map(to_rfc3339),
            pause_reason: paused.and(status.pause_reason).map(|r| r.describe()),
            key_refused: status.held || counts.held > 0,
            key_refused_reason: status.held_reason.clone(),
            sent_in_window: used as usize,
            quota_limit: limit,
            quota_window_secs: window_ms / 1000,
            quota_left,
            quota_next_free_at: next_free.filter(|&t| t > now).map(to_rfc3339),
            drain_estimate_secs: estimate,
            quota_frees_at: next_free.filter(|&t| t > now),
        });
    }
    Ok(businesses)
}

/// Seconds until the backlog is sent at this quota, from the end of the
/// Market's pause; `None` while the business's key is refused (nothing
/// drains until someone fixes it).
#[allow(clippy::too_many_arguments)]
fn drain_estimate(
    now: Millis,
    status: &BusinessStatus,
    counts: &BusinessQueue,
    backlog: i64,
    quota_left: i64,
    limit: i64,
    window_ms: Millis,
    next_free: Option<Millis>,
) -> Option<i64> {
    if status.held || counts.held > 0 {
        return None;
    }
    if backlog == 0 {
        return Some(0);
    }
    if limit <= 0 {
        return None;
    }
    let ms = match status.paused_until.filter(|&u| u > now) {
        // The Market's window is used up until then; a fresh one follows.
        Some(until) => (until - now) + (backlog - 1) / limit * window_ms,
        None if backlog <= quota_left => 0,
        None => {
            // What the quota left covers goes now; the rest a window per `limit`.
            let windows = (backlog - quota_left + limit - 1) / limit;
            let first_free = next_free.map(|t| t - now).unwrap_or(window_ms).max(0);
            first_free + (windows - 1) * window_ms
        }
    };
    // Round up: "0 s" must mean nothing waits.
    Some((ms + 999) / 1000)
}
