//! A batch in one round trip: when no write of a batch needs to read
//! before it writes (an event whose chats are all known and that is not
//! ordered against other events, and any record but a `chats/new` one),
//! BEGIN, the locks, the notifications, every write (an event and its
//! deliveries in one statement, a record's statements side by side) and
//! COMMIT are sent to the server together, and the batch waits once for
//! the server (and its fsync), not once per step.
//!
//! The notifications go out before the writes (they are delivered only on
//! commit, so nobody is woken before the work is visible): to every
//! business with a queued delivery in the batch or an answer recorded,
//! which may wake a dispatcher for nothing (an answer that came after its
//! lease was taken over), never too few.
//!
//! If any statement fails, PostgreSQL refuses the rest and turns the
//! COMMIT into a rollback; then the batch is reported failed (and its
//! writes run again alone, see `batch.rs`), never as stored.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures_util::future::{maybe_done, MaybeDone};
use tokio_postgres::Statement;

use super::writes::{
    cached, event_businesses, ATTEMPT_SQL, PAUSE_SQL, SLOT_GIVE_SQL, SLOT_KEEP_SQL, UPDATE_SQL,
};
use super::*;

/// One event and its deliveries in one statement: the event's id (none if
/// its key is stored already) and its deliveries' ids in their order.
const EVENT_SQL: &str = "WITH e AS (
        INSERT INTO events (source, external_id, event_type, payload, received_at, business_id)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (source, external_id) DO NOTHING
        RETURNING id),
    d AS (
        INSERT INTO deliveries (event_id, route, template, business_id, chat_id, text, state,
            reason, created_at, queued_at, next_attempt_at, updated_at, conversation)
        SELECT e.id, x.route, x.template, x.business_id, x.chat_id, x.text, x.state,
            x.reason, $5, $5, $5, $5, x.conversation
        FROM e, unnest($7::text[], $8::text[], $9::int8[], $10::int8[], $11::text[],
                       $12::text[], $13::text[], $14::text[])
            WITH ORDINALITY AS x(route, template, business_id, chat_id, text, state, reason,
                                 conversation, n)
        ORDER BY x.n
        RETURNING id)
    SELECT (SELECT id FROM e), ARRAY(SELECT id FROM d ORDER BY id)";

/// Whether the event is written by one statement that reads nothing
/// first: not ordered against other events (`later_news`), and no
/// delivery to an order or return whose chat must be looked up.
pub(super) fn event_in_one_statement(event: &NewEvent) -> bool {
    event.ordering.is_none()
        && event.deliveries.iter().all(|d| match &d.rendered {
            Ok(m) => matches!(m.target, Target::Chat(_)),
            Err(f) => f.business_id.is_none() || !matches!(f.target, Some(Target::Context(_))),
        })
}

/// What one write of the batch gives back once its statements answered.
pub(super) enum Written {
    /// The event's id and its deliveries' ids; `None`: its key was stored.
    Event(Option<(i64, Vec<i64>)>),
    Record,
}

type Step<'a, T> = Pin<Box<MaybeDone<Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'a>>>>>;

fn step<'a, T>(f: impl Future<Output = StoreResult<T>> + Send + 'a) -> Step<'a, T> {
    Box::pin(maybe_done(
        Box::pin(f) as Pin<Box<dyn Future<Output = _> + Send + 'a>>
    ))
}

/// A write's statements, each sent on its first poll.
fn event_step<'a>(
    client: &'a tokio_postgres::Client,
    stmt: Statement,
    event: &'a NewEvent,
) -> Step<'a, Option<Written>> {
    step(async move {
        let n = event.deliveries.len();
        let (mut routes, mut templates, mut businesses, mut chats, mut texts) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut states, mut reasons, mut conversations) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for d in &event.deliveries {
            routes.push(d.route.as_str());
            templates.push(d.template.as_str());
            let (business, target, text, state, reason) = match &d.rendered {
                Ok(m) => (
                    Some(m.business_id.0),
                    Some(m.target),
                    Some(m.text.as_str()),
                    DeliveryState::Queued,
                    None,
                ),
                Err(f) => (
                    f.business_id.map(|b| b.0),
                    f.business_id.and(f.target),
                    None,
                    DeliveryState::Failed,
                    Some(f.reason.as_str()),
                ),
            };
            let chat = match target {
                Some(Target::Chat(chat)) => Some(chat),
                _ => None,
            };
            businesses.push(business);
            chats.push(chat.map(|c| c.0));
            texts.push(text);
            states.push(state.as_str());
            reasons.push(reason);
            conversations.push(chat.and_then(|c| crate::domain::conversation_key(Some(c), None)));
        }
        let row = client
            .query_one(
                &stmt,
                &[
                    &event.source,
                    &event.external_id,
                    &event.event_type,
                    &event.payload,
                    &event.received_at,
                    &event.business_id.map(|b| b.0),
                    &routes,
                    &templates,
                    &businesses,
                    &chats,
                    &texts,
                    &states,
                    &reasons,
                    &conversations,
                ],
            )
            .await
            .map_err(db_error)?;
        let id: Option<i64> = row.get(0);
        Ok(Some(Written::Event(id.map(|id| (id, row.get(1))))))
    })
}

struct RecordStatements {
    attempt: Statement,
    slot_keep: Statement,
    slot_give: Statement,
    pause: Statement,
    update: Statement,
}

fn record_step<'a>(
    client: &'a tokio_postgres::Client,
    s: &'a RecordStatements,
    attempt: &'a Attempt,
    now: Millis,
) -> Step<'a, Option<Written>> {
    step(async move {
        let errors = serde_json::to_string(&attempt.api_errors).unwrap_or_else(|_| "[]".into());
        let (status, outcome_name, method) = (
            attempt.http_status.map(i32::from),
            attempt.verdict.outcome_name(),
            attempt.method.as_str(),
        );
        let attempt_params: [&(dyn ToSql + Sync); 11] = [
            &attempt.delivery_id,
            &attempt.business_id.0,
            &attempt.started_at,
            &attempt.finished_at,
            &attempt.latency_ms,
            &status,
            &outcome_name,
            &errors,
            &attempt.error,
            &attempt.counts_for_quota,
            &method,
        ];
        let keep_params: [&(dyn ToSql + Sync); 5] = [
            &attempt.claim_token,
            &attempt.delivery_id,
            &attempt.business_id.0,
            &method,
            &attempt.finished_at,
        ];
        let give_params: [&(dyn ToSql + Sync); 1] = [&attempt.claim_token];
        let pauses: Vec<(Millis, &'static str)> = pauses_of(attempt)
            .into_iter()
            .map(|(until, reason)| (until, reason.as_str()))
            .collect();
        let pause_params: Vec<[&(dyn ToSql + Sync); 4]> = pauses
            .iter()
            .map(|(until, reason)| {
                [
                    &attempt.business_id.0 as &(dyn ToSql + Sync),
                    &method,
                    until,
                    reason,
                ]
            })
            .collect();
        let (state, reason, next, delivered_at, counted) = attempt.outcome(now);
        let state = state.as_str();
        let update_params: [&(dyn ToSql + Sync); 8] = [
            &attempt.delivery_id,
            &state,
            &reason,
            &next,
            &delivered_at,
            &counted,
            &now,
            &attempt.claim_token,
        ];
        let insert = client.execute(&s.attempt, &attempt_params);
        let slot = match attempt.counts_for_quota {
            true => client.execute(&s.slot_keep, &keep_params),
            false => client.execute(&s.slot_give, &give_params),
        };
        let paused = futures_util::future::join_all(
            pause_params.iter().map(|p| client.execute(&s.pause, p)),
        );
        let update = client.execute(&s.update, &update_params);
        // Joined, each is sent when first polled: in this order.
        let (inserted, slot, paused, changed) =
            futures_util::future::join4(insert, slot, paused, update).await;
        inserted.map_err(db_error)?;
        slot.map_err(db_error)?;
        for p in paused {
            p.map_err(db_error)?;
        }
        let changed = changed.map_err(db_error)?;
        if changed == 0 {
            tracing::warn!(
                delivery = attempt.delivery_id,
                "an answer came after the delivery's lease was taken over; recorded as an attempt only"
            );
        }
        Ok(Some(Written::Record))
    })
}

/// Polls every step until all are done, each first in the order given:
/// that first poll sends its statements, so they reach the server in order.
async fn run_in_order<T>(steps: &mut [Step<'_, T>]) {
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for s in steps.iter_mut() {
            pending |= s.as_mut().poll(cx).is_pending();
        }
        match pending {
            true => Poll::Pending,
            false => Poll::Ready(()),
        }
    })
    .await
}

/// A write of a pipelined batch.
pub(super) enum Item<'a> {
    Event(&'a NewEvent),
    Record(&'a Attempt, Millis),
}

/// The batch in one transaction, sent at once. `Err` when any statement
/// failed (nothing of the batch is stored) or the commit did.
pub(super) async fn write_pipelined(
    client: &Object,
    items: &[Item<'_>],
) -> StoreResult<Vec<Written>> {
    // Prepared first: a statement prepared while the batch is being sent
    // would go out after the COMMIT.
    let lock = cached(client, super::writes::LOCK_SHARED_SQL).await?;
    let notify = cached(client, super::writes::NOTIFY_SQL).await?;
    let event = cached(client, EVENT_SQL).await?;
    let records = RecordStatements {
        attempt: cached(client, ATTEMPT_SQL).await?,
        slot_keep: cached(client, SLOT_KEEP_SQL).await?,
        slot_give: cached(client, SLOT_GIVE_SQL).await?,
        pause: cached(client, PAUSE_SQL).await?,
        update: cached(client, UPDATE_SQL).await?,
    };
    let mut businesses = Vec::new();
    let mut due: Vec<Option<i64>> = Vec::new();
    for item in items {
        match item {
            Item::Event(e) => {
                businesses.extend(event_businesses(e));
                due.extend(
                    e.deliveries
                        .iter()
                        .filter_map(|d| d.rendered.as_ref().ok())
                        .map(|m| Some(m.business_id.0)),
                );
            }
            Item::Record(a, _) => due.push(Some(a.business_id.0)),
        }
    }
    businesses.sort_unstable();
    businesses.dedup();
    due.sort_unstable();
    due.dedup();
    let payloads: Vec<String> = due
        .iter()
        .map(|b| b.map(|b| b.to_string()).unwrap_or_default())
        .collect();
    let client: &tokio_postgres::Client = client;
    let mut steps: Vec<Step<'_, Option<Written>>> = vec![step(async {
        client
            .batch_execute("BEGIN")
            .await
            .map(|_| None)
            .map_err(db_error)
    })];
    if !businesses.is_empty() {
        steps.push(step(async {
            client
                .execute(&lock, &[&BUSINESS_LOCK, &businesses])
                .await
                .map(|_| None)
                .map_err(db_error)
        }));
    }
    if !payloads.is_empty() {
        steps.push(step(async {
            client
                .execute(&notify, &[&listen::CHANNEL, &payloads])
                .await
                .map(|_| None)
                .map_err(db_error)
        }));
    }
    for item in items {
        steps.push(match item {
            Item::Event(e) => event_step(client, event.clone(), e),
            Item::Record(a, now) => record_step(client, &records, a, *now),
        });
    }
    steps.push(step(async {
        client
            .batch_execute("COMMIT")
            .await
            .map(|_| None)
            .map_err(db_error)
    }));
    run_in_order(&mut steps).await;
    // Statements run in order: the first error is the cause, the later
    // ones only say the transaction was already failed (and the COMMIT
    // then rolled back).
    let mut written = Vec::with_capacity(items.len());
    for s in steps.iter_mut() {
        match s.as_mut().take_output() {
            Some(Ok(Some(w))) => written.push(w),
            Some(Ok(None)) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(StoreError::Database("a batch step did not finish".into())),
        }
    }
    Ok(written)
}
