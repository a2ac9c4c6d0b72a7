//! A batch in one round trip: when no write of a batch needs to read
//! before it writes (an event whose chats are all known and that is not
//! ordered against other events, and any record but a `chats/new` one),
//! BEGIN, the locks, the notifications, the writes and COMMIT are sent to
//! the server together, and the batch waits once for the server (and its
//! fsync), not once per step.
//!
//! Each kind of write goes as one statement for the whole batch, its
//! values in arrays: every event and its deliveries in one, every answer's
//! attempt in one, every quota slot kept in one and given back in one,
//! every delivery's new state in one. The server's cost of a statement
//! (its executor started, its triggers fired: the quota counts' trigger
//! runs once per statement) is paid once per batch, not once per write:
//! with a statement per write the database's CPU, not the service's, set
//! the PostgreSQL rate (see README "Performance"). Rows are written in
//! the order the writes arrived (ids from the sequences in that order).
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

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures_util::future::{maybe_done, MaybeDone};

use super::writes::{cached, event_businesses, RecordColumns, UPDATES_SQL};
use super::*;

/// Every event of the batch and its deliveries in one statement: per event
/// (in the order given, `n`), its id (none if its key is stored already)
/// and its deliveries' ids in their order. An event's deliveries name it
/// by its place in the batch (`$7`).
const EVENTS_SQL: &str = "WITH x AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[])
            WITH ORDINALITY AS x(source, external_id, event_type, payload, received_at,
                                 business_id, n)),
    e AS (
        INSERT INTO events (source, external_id, event_type, payload, received_at, business_id)
        SELECT source, external_id, event_type, payload, received_at, business_id
        FROM x ORDER BY n
        ON CONFLICT (source, external_id) DO NOTHING
        RETURNING id, source, external_id),
    xe AS (
        SELECT x.n, x.received_at, e.id FROM x
        JOIN e ON e.source = x.source AND e.external_id = x.external_id),
    d AS (
        INSERT INTO deliveries (event_id, route, template, business_id, chat_id, text, state,
            reason, created_at, queued_at, next_attempt_at, updated_at, conversation)
        SELECT xe.id, y.route, y.template, y.business_id, y.chat_id, y.text, y.state,
            y.reason, xe.received_at, xe.received_at, xe.received_at, xe.received_at,
            y.conversation
        FROM unnest($7::int8[], $8::text[], $9::text[], $10::int8[], $11::int8[], $12::text[],
                    $13::text[], $14::text[], $15::text[])
            WITH ORDINALITY AS y(event_n, route, template, business_id, chat_id, text, state,
                                 reason, conversation, m)
        JOIN xe ON xe.n = y.event_n
        ORDER BY y.m
        RETURNING id, event_id)
    SELECT x.n, xe.id, COALESCE(ds.ids, '{}')
    FROM x LEFT JOIN xe ON xe.n = x.n
    LEFT JOIN (SELECT event_id, array_agg(id ORDER BY id) AS ids FROM d GROUP BY event_id) ds
        ON ds.event_id = xe.id
    ORDER BY x.n";

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

/// A write of a pipelined batch.
pub(super) enum Item<'a> {
    Event(&'a NewEvent),
    Record(&'a Attempt, Millis),
}

/// The batch's events as the columns of [`EVENTS_SQL`].
#[derive(Default)]
struct EventColumns<'a> {
    sources: Vec<&'a str>,
    external_ids: Vec<&'a str>,
    types: Vec<&'a str>,
    payloads: Vec<&'a str>,
    received: Vec<Millis>,
    businesses: Vec<Option<i64>>,
    // Their deliveries, each with its event's place (from 1).
    event_n: Vec<i64>,
    routes: Vec<&'a str>,
    templates: Vec<&'a str>,
    delivery_businesses: Vec<Option<i64>>,
    chats: Vec<Option<i64>>,
    texts: Vec<Option<&'a str>>,
    states: Vec<&'static str>,
    reasons: Vec<Option<&'a str>>,
    conversations: Vec<Option<String>>,
}

impl<'a> EventColumns<'a> {
    fn push(&mut self, event: &'a NewEvent) {
        self.sources.push(&event.source);
        self.external_ids.push(&event.external_id);
        self.types.push(&event.event_type);
        self.payloads.push(&event.payload);
        self.received.push(event.received_at);
        self.businesses.push(event.business_id.map(|b| b.0));
        let n = self.sources.len() as i64;
        for d in &event.deliveries {
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
            self.event_n.push(n);
            self.routes.push(&d.route);
            self.templates.push(&d.template);
            self.delivery_businesses.push(business);
            self.chats.push(chat.map(|c| c.0));
            self.texts.push(text);
            self.states.push(state.as_str());
            self.reasons.push(reason);
            self.conversations
                .push(chat.and_then(|c| crate::domain::conversation_key(Some(c), None)));
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 15] {
        [
            &self.sources,
            &self.external_ids,
            &self.types,
            &self.payloads,
            &self.received,
            &self.businesses,
            &self.event_n,
            &self.routes,
            &self.templates,
            &self.delivery_businesses,
            &self.chats,
            &self.texts,
            &self.states,
            &self.reasons,
            &self.conversations,
        ]
    }
}

/// What a statement of the batch gave back.
enum Answer {
    Nothing,
    /// Per event in order: its id and its deliveries' ids, or `None`.
    Events(Vec<Option<(i64, Vec<i64>)>>),
    /// The (delivery, claim token) pairs whose state an answer changed.
    Updated(Vec<(i64, i64)>),
}

type Step<'a> = Pin<Box<MaybeDone<Pin<Box<dyn Future<Output = StoreResult<Answer>> + Send + 'a>>>>>;

fn step<'a>(f: impl Future<Output = StoreResult<Answer>> + Send + 'a) -> Step<'a> {
    Box::pin(maybe_done(
        Box::pin(f) as Pin<Box<dyn Future<Output = _> + Send + 'a>>
    ))
}

/// A statement whose answer is only whether it ran.
fn run_step<'a>(
    client: &'a tokio_postgres::Client,
    statement: &'a tokio_postgres::Statement,
    params: Vec<&'a (dyn ToSql + Sync)>,
) -> Step<'a> {
    step(async move {
        client
            .execute(statement, &params)
            .await
            .map(|_| Answer::Nothing)
            .map_err(db_error)
    })
}

/// Polls every step until all are done, each first in the order given:
/// that first poll sends its statements, so they reach the server in order.
async fn run_in_order(steps: &mut [Step<'_>]) {
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

/// The batch in one transaction, sent at once. `Err` when any statement
/// failed (nothing of the batch is stored) or the commit did.
pub(super) async fn write_pipelined(
    client: &Object,
    items: &[Item<'_>],
) -> StoreResult<Vec<Written>> {
    let mut events = EventColumns::default();
    let mut records = RecordColumns::default();
    let mut businesses = Vec::new();
    let mut due: Vec<Option<i64>> = Vec::new();
    for item in items {
        match item {
            Item::Event(e) => {
                events.push(e);
                businesses.extend(event_businesses(e));
                due.extend(
                    e.deliveries
                        .iter()
                        .filter_map(|d| d.rendered.as_ref().ok())
                        .map(|m| Some(m.business_id.0)),
                );
            }
            Item::Record(a, now) => {
                records.push(a, *now);
                due.push(Some(a.business_id.0));
            }
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

    // Prepared first: a statement prepared while the batch is being sent
    // would go out after the COMMIT.
    let lock = cached(client, super::writes::LOCK_SHARED_SQL).await?;
    let notify = cached(client, super::writes::NOTIFY_SQL).await?;
    let write_events = cached(client, EVENTS_SQL).await?;
    let mut record_statements = Vec::new();
    if !records.is_empty() {
        for (sql, params) in records.statements() {
            record_statements.push((cached(client, sql).await?, params));
        }
    }
    let update = cached(client, UPDATES_SQL).await?;

    let client: &tokio_postgres::Client = client;
    let transaction = |sql: &'static str| {
        step(async move {
            client
                .batch_execute(sql)
                .await
                .map(|_| Answer::Nothing)
                .map_err(db_error)
        })
    };
    let mut steps: Vec<Step<'_>> = vec![transaction("BEGIN")];
    if !businesses.is_empty() {
        steps.push(run_step(client, &lock, vec![&BUSINESS_LOCK, &businesses]));
    }
    if !payloads.is_empty() {
        steps.push(run_step(client, &notify, vec![&listen::CHANNEL, &payloads]));
    }
    if !events.sources.is_empty() {
        let (statement, params) = (&write_events, events.params());
        steps.push(step(async move {
            let rows = client.query(statement, &params).await.map_err(db_error)?;
            Ok(Answer::Events(
                rows.iter()
                    .map(|r| r.get::<_, Option<i64>>(1).map(|id| (id, r.get(2))))
                    .collect(),
            ))
        }));
    }
    if !records.is_empty() {
        for (statement, params) in &record_statements {
            steps.push(run_step(client, statement, params.clone()));
        }
        let (statement, params) = (&update, records.update_params());
        steps.push(step(async move {
            let rows = client.query(statement, &params).await.map_err(db_error)?;
            Ok(Answer::Updated(
                rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            ))
        }));
    }
    steps.push(transaction("COMMIT"));
    run_in_order(&mut steps).await;

    // Statements run in order: the first error is the cause, the later
    // ones only say the transaction was already failed (and the COMMIT
    // then rolled back).
    let mut stored = Vec::new();
    let mut changed = HashSet::new();
    for s in steps.iter_mut() {
        match s.as_mut().take_output() {
            Some(Ok(Answer::Nothing)) => {}
            Some(Ok(Answer::Events(e))) => stored = e,
            Some(Ok(Answer::Updated(u))) => changed.extend(u),
            Some(Err(e)) => return Err(e),
            None => return Err(StoreError::Database("a batch step did not finish".into())),
        }
    }
    if stored.len() != events.sources.len() {
        return Err(StoreError::Database(format!(
            "the batch's events statement answered for {} of {} events",
            stored.len(),
            events.sources.len()
        )));
    }
    let mut stored = stored.into_iter();
    let mut written = Vec::with_capacity(items.len());
    for item in items {
        written.push(match item {
            Item::Event(_) => Written::Event(stored.next().flatten()),
            Item::Record(attempt, _) => {
                if !changed.contains(&(attempt.delivery_id, attempt.claim_token)) {
                    tracing::warn!(
                        delivery = attempt.delivery_id,
                        "an answer came after the delivery's lease was taken over; recorded as an attempt only"
                    );
                }
                Written::Record
            }
        });
    }
    Ok(written)
}
