//! The overview: per business what waits and what is stuck, the quota, a
//! pause from the Market, held state, the drain estimate, and the
//! configuration in force. The numbers are the admin API's
//! (`admin::queue_overview`); the page refreshes itself (console.js).

use actix_web::{web, HttpResponse};
use askama::Template;

use super::labels::Labels;
use super::{ok_page, show_rfc3339, show_time, Chrome, Session, UiError};
use crate::admin::{queue_overview, BusinessOverview};
use crate::clock::Millis;
use crate::domain::DeliveryState;
use crate::state::AppState;
use crate::store::DeliveryFilter;

struct Row {
    b: BusinessOverview,
    quota_used: usize,
    quota_resets: String,
    drain: String,
    /// Until when, and the Market's answer.
    paused: Option<(String, String)>,
    held_reason: Option<String>,
    oldest_queued: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    c: Chrome,
    rows: Vec<Row>,
    version: String,
    reload_at: Option<String>,
    reload_error: Option<Vec<String>>,
    now: String,
}

pub async fn page(state: web::Data<AppState>, session: Session) -> Result<HttpResponse, UiError> {
    let l = session.lang.labels();
    let now = state.clock.now_ms();
    let mut rows = Vec::new();
    for b in queue_overview(&state).await? {
        let paused = market_pause(&state, b.business_id, now).await?;
        let held_reason = if b.held > 0 {
            state
                .store
                .list_deliveries(DeliveryFilter {
                    state: Some(DeliveryState::Held),
                    business_id: Some(b.business_id),
                    limit: 1,
                    ..DeliveryFilter::default()
                })
                .await?
                .into_iter()
                .next()
                .and_then(|d| d.reason)
        } else {
            None
        };
        rows.push(Row {
            quota_used: b.sent_in_window,
            quota_resets: b
                .quota_frees_at
                .map(show_time)
                .unwrap_or_else(|| "—".into()),
            drain: duration(l, b.drain_estimate_secs.unwrap_or_default()),
            paused,
            held_reason,
            oldest_queued: b
                .oldest_queued_at
                .as_deref()
                .map(show_rfc3339)
                .unwrap_or_else(|| "—".into()),
            b,
        });
    }
    let pipeline = state.pipeline.load();
    let reload = state
        .reload
        .status
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    Ok(ok_page(OverviewPage {
        c: Chrome::new(&session, "overview"),
        rows,
        version: pipeline.version.clone(),
        reload_at: reload.last_attempt_at.as_deref().map(show_rfc3339),
        reload_error: reload.last_error,
        now: show_time(now),
    }))
}

/// A 420 from the Market pauses the business: its first deliveries wait
/// for the window the Market named, and their last attempt says
/// `throttled`. Read from the store, so every instance sees it.
async fn market_pause(
    state: &AppState,
    business_id: i64,
    now: Millis,
) -> Result<Option<(String, String)>, UiError> {
    // Claims take the oldest deliveries first, so a throttled batch is at
    // the head of the business's queue.
    let head = state
        .store
        .list_deliveries(DeliveryFilter {
            state: Some(DeliveryState::Queued),
            business_id: Some(business_id),
            limit: 8,
            ..DeliveryFilter::default()
        })
        .await?;
    let waiting = head.iter().filter_map(|d| {
        let due = chrono::DateTime::parse_from_rfc3339(&d.next_attempt_at)
            .ok()?
            .timestamp_millis();
        (due > now).then_some((d.id, due))
    });
    let Some((id, until)) = waiting.max_by_key(|(_, due)| *due) else {
        return Ok(None);
    };
    let Some((_, attempts)) = state.store.delivery(id).await? else {
        return Ok(None);
    };
    let Some(last) = attempts.last().filter(|a| a.outcome == "throttled") else {
        return Ok(None);
    };
    let mut why = format!("HTTP {}", last.http_status.unwrap_or(420));
    for e in &last.api_errors {
        why.push_str(&format!("; {}", e.code));
        if let Some(m) = &e.message {
            why.push_str(&format!(": {m}"));
        }
    }
    Ok(Some((show_time(until), why)))
}

/// "2 ч 5 мин" / "2 h 5 min"; zero is "now".
fn duration(l: &Labels, secs: i64) -> String {
    if secs <= 0 {
        return l.now.to_owned();
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let (hu, mu, su) = if l.lang == "ru" {
        ("ч", "мин", "с")
    } else {
        ("h", "min", "s")
    };
    match (h, m) {
        (0, 0) => format!("{s} {su}"),
        (0, m) => format!("{m} {mu}"),
        (h, m) => format!("{h} {hu} {m} {mu}"),
    }
}
