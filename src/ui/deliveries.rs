//! Deliveries: the list with the admin API's filters and paging, one
//! delivery with its text, attempts and event, and retry / cancel / retry
//! by filter. Filters are parsed by the admin API's own `ListQuery`, and
//! the actions are the admin API's functions, so both behave alike.

use actix_web::{web, HttpRequest, HttpResponse};
use askama::Template;
use serde::Deserialize;

use super::labels::{state_name, Labels};
use super::{ok_page, redirect, show_rfc3339, Chrome, Session, UiError};
use crate::admin::{retry_by_filter, retry_one, ListQuery, Retried};
use crate::domain::DeliveryState;
use crate::state::AppState;
use crate::store::{AttemptRow, DeliveryRow};

/// The filter fields the list's form offers, in order, as the admin API
/// names them.
const FILTER_FIELDS: &[&str] = &[
    "state",
    "business_id",
    "chat_id",
    "order_id",
    "return_id",
    "route",
    "source",
    "since",
    "until",
    "limit",
];

/// The non-empty filter fields of a query string (plus `after` for
/// paging), re-encoded: what the admin API would be sent.
fn filter_pairs(query: &str, with_after: bool) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.trim().to_owned()))
        .filter(|(k, v)| {
            !v.is_empty() && (FILTER_FIELDS.contains(&k.as_str()) || (with_after && k == "after"))
        })
        .collect()
}

fn encode(pairs: &[(String, String)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

fn parse_filter(pairs: &[(String, String)]) -> Result<ListQuery, String> {
    serde_urlencoded::from_str::<ListQuery>(&encode(pairs)).map_err(|e| e.to_string())
}

pub struct Field {
    pub name: &'static str,
    pub label: &'static str,
    pub value: String,
    pub placeholder: &'static str,
}

pub struct StateOption {
    pub value: &'static str,
    pub label: &'static str,
    pub selected: bool,
}

fn form_fields(l: &'static Labels, pairs: &[(String, String)]) -> (Vec<StateOption>, Vec<Field>) {
    let value = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let current = value("state");
    let mut states = vec![StateOption {
        value: "",
        label: l.any,
        selected: current.is_empty(),
    }];
    states.extend(DeliveryState::ALL.into_iter().map(|s| StateOption {
        value: s.as_str(),
        label: state_name(l, s),
        selected: current == s.as_str(),
    }));
    let fields = [
        ("business_id", l.business, "123456"),
        ("chat_id", l.chat, "987654"),
        ("order_id", l.order, "51234567"),
        ("return_id", l.return_label, "7001"),
        ("route", l.route, "order-shipped"),
        ("source", l.source, "oms"),
        ("since", l.since, "2026-11-25T10:00:00Z"),
        ("until", l.until_time, "2026-11-26T10:00:00Z"),
        ("limit", l.per_page, "50"),
    ]
    .into_iter()
    .map(|(name, label, placeholder)| Field {
        name,
        label,
        value: value(name),
        placeholder,
    })
    .collect();
    (states, fields)
}

pub struct RowView {
    pub d: DeliveryRow,
    pub state_label: &'static str,
    pub created: String,
}

fn row_view(l: &Labels, d: DeliveryRow) -> RowView {
    RowView {
        state_label: state_name(l, d.state),
        created: show_rfc3339(&d.created_at),
        d,
    }
}

#[derive(Template)]
#[template(path = "deliveries.html")]
struct ListPage {
    c: Chrome,
    states: Vec<StateOption>,
    fields: Vec<Field>,
    rows: Vec<RowView>,
    error: Option<String>,
    filter_qs: String,
    next_href: Option<String>,
    first_href: Option<String>,
}

pub async fn list(
    state: web::Data<AppState>,
    session: Session,
    req: HttpRequest,
) -> Result<HttpResponse, UiError> {
    let l = session.lang.labels();
    let pairs = filter_pairs(req.query_string(), true);
    let without_after: Vec<_> = pairs
        .iter()
        .filter(|(k, _)| k != "after")
        .cloned()
        .collect();
    let (states, fields) = form_fields(l, &pairs);
    let mut page_view = ListPage {
        c: Chrome::new(&session, "deliveries"),
        states,
        fields,
        rows: Vec::new(),
        error: None,
        filter_qs: encode(&without_after),
        next_href: None,
        first_href: pairs
            .iter()
            .any(|(k, _)| k == "after")
            .then(|| format!("/ui/deliveries?{}", encode(&without_after))),
    };
    let filter = parse_filter(&pairs)
        .map_err(|e| e.to_string())
        .and_then(|q| q.to_filter().map_err(|e| e.message));
    match filter {
        Err(e) => page_view.error = Some(e),
        Ok(filter) => {
            let limit = filter.limit;
            let rows = state.store.list_deliveries(filter).await?;
            if rows.len() == limit {
                if let Some(last) = rows.last() {
                    let mut next = without_after.clone();
                    next.push(("after".into(), last.id.to_string()));
                    page_view.next_href = Some(format!("/ui/deliveries?{}", encode(&next)));
                }
            }
            page_view.rows = rows.into_iter().map(|d| row_view(l, d)).collect();
        }
    }
    Ok(ok_page(page_view))
}

pub struct AttemptView {
    pub a: AttemptRow,
    pub at: String,
    pub errors: Vec<String>,
}

#[derive(Template)]
#[template(path = "delivery.html")]
struct DeliveryPage {
    c: Chrome,
    d: RowView,
    text_len: usize,
    attempts: Vec<AttemptView>,
    event: Option<EventView>,
    notice: Option<&'static str>,
    can_retry: bool,
    can_cancel: bool,
}

pub struct EventView {
    pub id: i64,
    pub external_id: String,
    pub event_type: String,
    pub received_at: String,
    pub payload: String,
}

#[derive(Deserialize)]
pub struct ShowQuery {
    notice: Option<String>,
}

pub async fn show(
    state: web::Data<AppState>,
    session: Session,
    id: web::Path<i64>,
    query: web::Query<ShowQuery>,
) -> Result<HttpResponse, UiError> {
    let l = session.lang.labels();
    let id = id.into_inner();
    let (d, attempts) = state
        .store
        .delivery(id)
        .await?
        .ok_or_else(|| UiError::Status(404, format!("no delivery {id}")))?;
    let event = state.store.event(d.event_id).await?.map(|e| EventView {
        id: e.id,
        payload: serde_json::from_str::<serde_json::Value>(&e.payload)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or(e.payload),
        external_id: e.external_id,
        event_type: e.event_type,
        received_at: show_time_ms(e.received_at),
    });
    let attempts = attempts
        .into_iter()
        .map(|a| AttemptView {
            at: show_rfc3339(&a.at),
            errors: a
                .api_errors
                .iter()
                .map(|e| match &e.message {
                    Some(m) => format!("{}: {m}", e.code),
                    None => e.code.clone(),
                })
                .chain(a.error.clone())
                .collect(),
            a,
        })
        .collect();
    let notice = match query.notice.as_deref() {
        Some("queued") => Some(l.notice_queued),
        Some("failed") => Some(l.notice_failed),
        Some("cancelled") => Some(l.notice_cancelled),
        Some("changed") => Some(l.text_changed),
        Some("same") => Some(l.text_same),
        _ => None,
    };
    Ok(ok_page(DeliveryPage {
        c: Chrome::new(&session, "deliveries"),
        text_len: d.text.as_deref().map(|t| t.chars().count()).unwrap_or(0),
        can_retry: d.state.is_retryable_by_operator(),
        can_cancel: matches!(d.state, DeliveryState::Queued | DeliveryState::Held),
        d: row_view(l, d),
        attempts,
        event,
        notice,
    }))
}

fn show_time_ms(ms: crate::clock::Millis) -> String {
    super::show_time(ms)
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Re-renders with the templates in force and queues again; the page then
/// says whether the text changed.
pub async fn retry(
    state: web::Data<AppState>,
    session: Session,
    id: web::Path<i64>,
    form: web::Form<CsrfForm>,
) -> Result<HttpResponse, UiError> {
    session.check_csrf(&form.csrf)?;
    let id = id.into_inner();
    let retried = retry_one(&state, id).await?;
    let notice = match (&retried.error, retried.text_changed) {
        (Some(_), _) => "failed",
        (None, Some(true)) => "changed",
        (None, _) => "same",
    };
    Ok(redirect(&format!("/ui/deliveries/{id}?notice={notice}")))
}

pub async fn cancel(
    state: web::Data<AppState>,
    session: Session,
    id: web::Path<i64>,
    form: web::Form<CsrfForm>,
) -> Result<HttpResponse, UiError> {
    session.check_csrf(&form.csrf)?;
    let id = id.into_inner();
    state.store.cancel(id, state.clock.now_ms()).await?;
    Ok(redirect(&format!("/ui/deliveries/{id}?notice=cancelled")))
}

#[derive(Template)]
#[template(path = "retry.html")]
struct RetryPage {
    c: Chrome,
    /// The filter, as a query string, carried to the confirming POST.
    filter_qs: String,
    /// `None`: the preview; `Some`: what the retry did.
    done: Option<usize>,
    count: usize,
    results: Vec<Retried>,
    error: Option<String>,
}

/// The count and list of what a retry by this filter would send again,
/// from the admin function's dry run, with a button to do it.
pub async fn retry_preview(
    state: web::Data<AppState>,
    session: Session,
    req: HttpRequest,
) -> Result<HttpResponse, UiError> {
    let pairs = filter_pairs(req.query_string(), false);
    let filter_qs = encode(&pairs);
    let mut view = RetryPage {
        c: Chrome::new(&session, "deliveries"),
        filter_qs,
        done: None,
        count: 0,
        results: Vec::new(),
        error: None,
    };
    match parse_filter(&pairs) {
        Err(e) => view.error = Some(e),
        Ok(query) => match retry_by_filter(&state, query, true).await {
            Ok(preview) => {
                view.count = preview.deliveries.len();
                view.results = preview.deliveries;
            }
            Err(e) => view.error = Some(e.message),
        },
    }
    Ok(ok_page(view))
}

#[derive(Deserialize)]
pub struct RetryForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    filter: String,
}

pub async fn retry_matching(
    state: web::Data<AppState>,
    session: Session,
    form: web::Form<RetryForm>,
) -> Result<HttpResponse, UiError> {
    session.check_csrf(&form.csrf)?;
    let pairs = filter_pairs(&form.filter, false);
    let query = parse_filter(&pairs).map_err(|e| UiError::Status(400, e))?;
    let outcome = retry_by_filter(&state, query, false).await?;
    Ok(ok_page(RetryPage {
        c: Chrome::new(&session, "deliveries"),
        filter_qs: encode(&pairs),
        done: Some(outcome.queued),
        count: outcome.deliveries.len(),
        results: outcome.deliveries,
        error: None,
    }))
}
