//! `POST /hooks/{source}`: the way in. Checks, in the order DESIGN.md
//! fixes (unknown source 404, body too large 413, not JSON 415, bad
//! signature or token 401, invalid JSON or no event type 400), then routes
//! and renders the event and stores it with its deliveries. It answers 202
//! only after the store's commit is durable; a repeated event id answers
//! 200 with the stored result and `"duplicate": true`, unless its body
//! differs from the stored one (compared as parsed JSON): that is a
//! sender's mistake that would drop an event, so it answers 409
//! `event_id_conflict`. Every refused webhook is logged at WARN (at most
//! one line per source and code per `telemetry::REFUSAL_LOG_INTERVAL_MS`, with a count
//! of the lines left out); accepted ones at DEBUG. When the store is
//! unavailable the answer is 503 `store_unavailable` with `Retry-After`
//! (never 2xx without a commit); those refusals are counted for the one
//! outage line `store::health` writes, not logged each.

pub mod market;
pub mod signature;

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::api_error::ApiError;
use crate::clock::{to_rfc3339, Millis};
use crate::domain::Target;
use crate::pipeline::{hex, Pipeline};
use crate::render::EventMeta;
use crate::settings::SourceSettings;
use crate::state::AppState;
use crate::store::{Inserted, NewDelivery, NewEvent, RenderFailure, RenderedMessage, StoredEvent};
use signature::AuthHeaders;

pub async fn receive(
    state: web::Data<AppState>,
    req: HttpRequest,
    source: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // One configuration for the whole request, even if a reload lands meanwhile.
    let pipeline = state.pipeline.load_full();
    let source = source.into_inner();
    let result = accept(&state, &pipeline, &req, &source, payload).await;
    let outcome = match &result {
        Ok(r) if r.status() == actix_web::http::StatusCode::OK => Ok("duplicate"),
        Ok(_) => Ok("accepted"),
        Err(e) => Err(e),
    };
    note_outcome(&state, &pipeline, &req, &source, outcome);
    result
}

/// Counts a request in the webhook metric and logs a refusal (rate
/// limited), for both protocols. Only configured sources are labelled, so
/// strangers cannot grow the metric (or the refusal log's table).
pub(crate) fn note_outcome(
    state: &AppState,
    pipeline: &Pipeline,
    req: &HttpRequest,
    source: &str,
    outcome: Result<&'static str, &ApiError>,
) {
    let label = if pipeline.settings.sources.contains_key(source) {
        source
    } else {
        "unknown"
    };
    match outcome {
        Err(e) if e.code == "store_unavailable" => {
            // Logged once for the whole outage (store::health), with this count.
            state.store_health.refused();
            tracing::debug!(
                target: "chatbridge::ingest",
                source = %label,
                status = e.status.as_u16(),
                "webhook refused: the store is unavailable"
            );
        }
        Err(e) => {
            state.refusals.refused(
                state.clock.now_ms(),
                crate::telemetry::Refusal {
                    source: label,
                    requested_source: source,
                    status: e.status.as_u16(),
                    code: e.code,
                    reason: &e.message,
                    peer: req.peer_addr(),
                },
            );
        }
        Ok(_) => {}
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => e.code,
    };
    state
        .metrics
        .webhooks
        .with_label_values(&[label, outcome])
        .inc();
}

/// Reads the body within `server.max_body_bytes` (413) and
/// `server.body_timeout_ms` (408).
pub(crate) async fn read_body(
    pipeline: &Pipeline,
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<web::BytesMut, ApiError> {
    let limit = pipeline.settings.server.max_body_bytes;
    let too_large = || {
        ApiError::new(
            413,
            "body_too_large",
            format!("the body is over the {limit}-byte limit (server.max_body_bytes)"),
        )
    };
    let declared = header(req, "content-length").and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // A client that stops mid-body must not hold a connection forever.
    let body_timeout = std::time::Duration::from_millis(pipeline.settings.server.body_timeout_ms);
    tokio::time::timeout(body_timeout, async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::bad_request(format!("could not read the body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    })
    .await
    .map_err(|_| {
        ApiError::new(
            408,
            "request_timeout",
            format!(
                "the body did not arrive within {} ms (server.body_timeout_ms)",
                body_timeout.as_millis()
            ),
        )
    })?
}

/// 415 unless the request says its body is JSON.
pub(crate) fn require_json(req: &HttpRequest, what: &str) -> Result<(), ApiError> {
    let is_json = header(req, "content-type").is_some_and(|ct| {
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        media == "application/json"
            || (media.starts_with("application/") && media.ends_with("+json"))
    });
    if is_json {
        Ok(())
    } else {
        Err(ApiError::new(
            415,
            "unsupported_media_type",
            format!("send the {what} with Content-Type: application/json"),
        ))
    }
}

/// The deliveries a plan stores: rendered ones queued, the others failed
/// with their reason and the ids that did render.
pub(crate) fn deliveries_of(planned: Vec<crate::pipeline::Planned>) -> Vec<NewDelivery> {
    planned
        .into_iter()
        .map(|planned| NewDelivery {
            route: planned.route,
            template: planned.template,
            rendered: planned
                .rendered
                .map(|r| RenderedMessage {
                    business_id: r.business_id,
                    target: r.target,
                    text: r.text.into_string(),
                })
                // Keep the ids that did render, so the failed delivery
                // shows up when filtering by its business or chat.
                .map_err(|reason| RenderFailure {
                    reason,
                    business_id: planned.business_id,
                    target: planned.target,
                }),
        })
        .collect()
}

/// Why each delivery failed to render (`None`: it rendered), in order.
pub(crate) fn failure_reasons(deliveries: &[NewDelivery]) -> Vec<Option<String>> {
    deliveries
        .iter()
        .map(|d| d.rendered.as_ref().err().map(|f| f.reason.clone()))
        .collect()
}

/// Whether new deliveries need a dispatcher round now. Not when each one
/// goes to a known chat of a business whose sends are blocked (its quota
/// used up, a pause, a refused key): the dispatcher already waits for the
/// time that ends, and a round per webhook would only find nothing to take
/// (with a seller over quota, hundreds of rounds a second, each reading
/// the queue). A delivery whose chat must be found first may still go
/// (`chats/new` has its own quota), so it wakes the dispatcher.
pub(crate) fn needs_round(state: &AppState, deliveries: &[NewDelivery], now: Millis) -> bool {
    deliveries.iter().any(|d| match &d.rendered {
        Ok(m) => match m.target {
            Target::Chat(_) => !state.dispatch.sends_blocked(m.business_id, now),
            Target::Context(_) => true,
        },
        Err(_) => false,
    })
}

/// What follows a new event's commit: metrics, the failed renders' log
/// lines, and waking the dispatcher when the deliveries need a round
/// (`needs_round`, decided before the insert).
pub(crate) fn after_commit(
    state: &AppState,
    req: &HttpRequest,
    stored: &StoredEvent,
    reasons: &[Option<String>],
    wake: bool,
) {
    for d in &stored.deliveries {
        state
            .metrics
            .deliveries_total
            .with_label_values(&[d.state.as_str()])
            .inc();
    }
    log_failures(stored, reasons);
    tracing::debug!(
        source = %stored.source,
        event_id = %stored.external_id,
        event_type = %stored.event_type,
        deliveries = stored.deliveries.len(),
        peer = req.peer_addr().map(|p| p.to_string()),
        "webhook accepted"
    );
    if wake {
        state.wake.notify_one();
    }
}

async fn accept(
    state: &AppState,
    pipeline: &Pipeline,
    req: &HttpRequest,
    source: &str,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let source = source.to_owned();
    let Some(source_settings) = pipeline.settings.sources.get(&source) else {
        return Err(ApiError::new(
            404,
            "unknown_source",
            format!("no source {source:?} is configured"),
        ));
    };
    if source_settings.kind == crate::settings::SourceKind::Market {
        return Err(ApiError::new(
            404,
            "wrong_path",
            format!(
                "source {source:?} receives the Market's notifications at POST /hooks/{source}/notification \
                 (register https://<host>/hooks/{source} in the Market's cabinet)"
            ),
        ));
    }
    let body = read_body(pipeline, req, payload).await?;
    require_json(req, "event")?;
    let now = state.clock.now_ms();
    let headers = AuthHeaders {
        webhook_id: header(req, "webhook-id"),
        webhook_timestamp: header(req, "webhook-timestamp"),
        webhook_signature: header(req, "webhook-signature"),
        authorization: header(req, "authorization"),
    };
    signature::verify(source_settings, headers, &body, now)
        .map_err(|e| ApiError::new(401, "unauthorized", e.to_string()))?;

    let ParsedEvent {
        payload: event,
        event_type,
        event_id,
    } = parse_event(
        source_settings,
        &body,
        headers.webhook_id,
        pipeline.settings.server.max_json_depth,
    )?;

    let meta = EventMeta {
        source: source.clone(),
        event_type: event_type.clone(),
        id: event_id.clone(),
        received_at: to_rfc3339(now),
        business_id: None,
    };
    let (planned, event) = pipeline.plan_owned(event, &meta);
    let deliveries = deliveries_of(planned);
    let reasons = failure_reasons(&deliveries);
    let wake = needs_round(state, &deliveries, now);
    let inserted = state
        .store
        .insert_event(NewEvent {
            source: source.clone(),
            external_id: event_id,
            event_type,
            payload: String::from_utf8_lossy(&body).into_owned(),
            received_at: now,
            deliveries,
            business_id: None,
            ordering: None,
        })
        .await?;
    Ok(match inserted {
        Inserted::New(stored) => {
            after_commit(state, req, &stored, &reasons, wake);
            HttpResponse::Accepted().json(answer(&stored, false))
        }
        Inserted::Duplicate(stored) => {
            if !same_event(&stored.payload, &event) {
                return Err(ApiError::new(
                    409,
                    "event_id_conflict",
                    format!(
                        "event id {:?} of source {source:?} was already used by another event, received at {}; \
                         this body differs from the stored one, so it was not stored. \
                         Give each event its own id (sources.{source}.event_id points at the id field)",
                        stored.external_id,
                        to_rfc3339(stored.received_at)
                    ),
                ));
            }
            tracing::debug!(
                source = %stored.source,
                event_id = %stored.external_id,
                peer = req.peer_addr().map(|p| p.to_string()),
                "webhook is a repeat of a stored event; nothing new stored"
            );
            HttpResponse::Ok().json(answer(&stored, true))
        }
    })
}

/// Whether a repeat carries the stored event: equal as parsed JSON, so key
/// order and spacing do not matter (serde_json compares objects as maps).
fn same_event(stored: &str, received: &Value) -> bool {
    serde_json::from_str::<Value>(stored).is_ok_and(|s| &s == received)
}

/// An event as the core sees it: its JSON, type and id.
#[derive(Debug)]
pub struct ParsedEvent {
    pub payload: Value,
    pub event_type: String,
    pub event_id: String,
}

/// Parses a verified body: JSON no deeper than `max_depth`, an object, with
/// a non-empty string at the source's event-type pointer. The id comes
/// from the event-id pointer, else the `webhook-id` header, else the
/// body's SHA-256 (so a byte-identical repeat is still a duplicate).
pub fn parse_event(
    source: &SourceSettings,
    body: &[u8],
    webhook_id: Option<&str>,
    max_depth: usize,
) -> Result<ParsedEvent, ApiError> {
    if json_depth(body) > max_depth {
        return Err(ApiError::new(
            400,
            "json_too_deep",
            format!("the JSON nests deeper than {max_depth} levels (server.max_json_depth)"),
        ));
    }
    let payload: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !payload.is_object() {
        return Err(ApiError::new(
            400,
            "invalid_json",
            "the event must be a JSON object",
        ));
    }
    let event_type = match payload.pointer(source.event_type_pointer()) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(ApiError::new(
                400,
                "missing_event_type",
                format!(
                    "no event type (a non-empty string) at {:?}",
                    source.event_type_pointer()
                ),
            ))
        }
    };
    let event_id = source
        .event_id
        .as_deref()
        .and_then(|p| scalar_text(payload.pointer(p)?))
        .or_else(|| webhook_id.filter(|id| !id.is_empty()).map(str::to_owned))
        .unwrap_or_else(|| hex(&Sha256::digest(body)));
    Ok(ParsedEvent {
        payload,
        event_type,
        event_id,
    })
}

/// The deepest nesting of arrays and objects, counted without parsing
/// (strings skipped), so a hostile body cannot make the parser recurse.
pub fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn answer(stored: &StoredEvent, duplicate: bool) -> Value {
    let mut body = json!({
        "event_id": stored.external_id,
        "deliveries": stored.deliveries,
    });
    if duplicate {
        body["duplicate"] = json!(true);
    }
    body
}

/// `reasons` holds, in the order of the stored deliveries, why each one
/// failed to render (`None`: it rendered).
fn log_failures(stored: &StoredEvent, reasons: &[Option<String>]) {
    for (d, reason) in stored.deliveries.iter().zip(reasons) {
        if d.state != crate::domain::DeliveryState::Failed {
            continue;
        }
        tracing::warn!(
            delivery = d.id,
            route = %d.route,
            source = %stored.source,
            event_id = %stored.external_id,
            reason = reason.as_deref(),
            "delivery failed to render; fix the template and retry it"
        );
    }
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
