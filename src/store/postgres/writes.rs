//! The two writes that come in floods, a webhook's event and a Market
//! answer's record, as steps inside a transaction that the caller opens,
//! locks and commits: one at a time (`insert_alone`, `record_alone`) or
//! gathered with others into one transaction (`batch`). The steps leave
//! locking and announcing to the caller, so a batch takes its locks in one
//! statement, in one fixed order, and sends one notification per business.

use deadpool_postgres::GenericClient;
use tokio_postgres::Statement;

use super::*;

/// The statement `sql`, prepared once per connection: a statement sent as
/// text is parsed and planned by the server each time, and costs a round
/// trip more.
pub(super) async fn cached(c: &impl GenericClient, sql: &str) -> StoreResult<Statement> {
    c.prepare_cached(sql).await.map_err(db_error)
}

/// The businesses' shared locks, in the order of their keys (the ORDER BY
/// in a subquery keeps the lock calls in its order).
pub(super) const LOCK_SHARED_SQL: &str = "SELECT pg_advisory_xact_lock_shared($1, k) FROM (
    SELECT DISTINCT hashint8(b) AS k FROM unnest($2::int8[]) AS b ORDER BY k) AS keys";
/// One notification per payload.
pub(super) const NOTIFY_SQL: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p";
/// The later pause wins, with its reason.
const PAUSE_SQL: &str = "INSERT INTO method_pauses (business_id, method, until_at, reason)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (business_id, method) DO UPDATE SET
        reason = CASE WHEN EXCLUDED.until_at > method_pauses.until_at
            THEN EXCLUDED.reason ELSE method_pauses.reason END,
        until_at = GREATEST(method_pauses.until_at, EXCLUDED.until_at)";

/// The answers' attempts (one answer's, or a batch's: every statement of
/// a record takes arrays, one element per answer), in the order given.
const ATTEMPTS_SQL: &str = "INSERT INTO attempts (delivery_id, business_id, started_at,
        finished_at, latency_ms, http_status, outcome, api_errors, error, counts_quota, method)
    SELECT delivery_id, business_id, started_at, finished_at, latency_ms, http_status, outcome,
        api_errors, error, counts_quota, method
    FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int4[],
                $7::text[], $8::text[], $9::text[], $10::bool[], $11::text[])
        WITH ORDINALITY AS a(delivery_id, business_id, started_at, finished_at, latency_ms,
                             http_status, outcome, api_errors, error, counts_quota, method, n)
    ORDER BY n";

/// The claims' quota slots of the calls the Market counted, moved to the
/// answers' times (it may have counted a call any time up to its answer);
/// a new slot where the claim's is gone.
const SLOTS_KEEP_SQL: &str = "WITH x AS (
        SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::int8[])
            WITH ORDINALITY AS x(token, delivery_id, business_id, method, at, n)),
    moved AS (
        UPDATE quota_slots q SET taken_at = x.at FROM x
        WHERE q.claim_token = x.token RETURNING q.claim_token)
    INSERT INTO quota_slots (claim_token, delivery_id, business_id, method, taken_at)
    SELECT -nextval('claim_tokens'), x.delivery_id, x.business_id, x.method, x.at FROM x
    WHERE NOT EXISTS (SELECT 1 FROM moved WHERE moved.claim_token = x.token)
    ORDER BY x.n";

/// The claims' quota slots of the calls the Market did not count, given back.
const SLOTS_GIVE_SQL: &str = "DELETE FROM quota_slots WHERE claim_token = ANY($1::int8[])";

/// The answered deliveries' new states, each only while it carries its
/// claim's token (else the answer came after its lease was taken over).
/// Returns the (delivery, token) pairs changed.
pub(super) const UPDATES_SQL: &str = "UPDATE deliveries d SET state = x.state,
        reason = CASE WHEN x.state = 'delivered' THEN NULL ELSE COALESCE(x.reason, d.reason) END,
        next_attempt_at = x.next_at, delivered_at = x.delivered_at,
        attempts = d.attempts + x.counted, lease_until = NULL, updated_at = x.now
    FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[],
                $7::int8[], $8::int8[])
        AS x(id, state, reason, next_at, delivered_at, counted, now, token)
    WHERE d.id = x.id AND d.claim_token = x.token
    RETURNING d.id, d.claim_token";

/// Answers as the columns of the record statements (one answer alone, or
/// a batch's).
#[derive(Default)]
pub(super) struct RecordColumns<'a> {
    // ATTEMPTS_SQL
    delivery_ids: Vec<i64>,
    businesses: Vec<i64>,
    started: Vec<Millis>,
    finished: Vec<Millis>,
    latencies: Vec<i64>,
    statuses: Vec<Option<i32>>,
    outcomes: Vec<&'static str>,
    api_errors: Vec<String>,
    errors: Vec<Option<&'a str>>,
    counts_quota: Vec<bool>,
    methods: Vec<&'static str>,
    // SLOTS_KEEP_SQL
    keep_tokens: Vec<i64>,
    keep_deliveries: Vec<i64>,
    keep_businesses: Vec<i64>,
    keep_methods: Vec<&'static str>,
    keep_at: Vec<Millis>,
    // SLOTS_GIVE_SQL
    give_tokens: Vec<i64>,
    // PAUSE_SQL, one statement each (rare)
    pauses: Vec<(i64, &'static str, Millis, &'static str)>,
    // UPDATES_SQL
    states: Vec<&'static str>,
    reasons: Vec<Option<String>>,
    next_at: Vec<Millis>,
    delivered_at: Vec<Option<Millis>>,
    counted: Vec<i64>,
    now: Vec<Millis>,
    tokens: Vec<i64>,
}

impl<'a> RecordColumns<'a> {
    pub(super) fn push(&mut self, attempt: &'a Attempt, now: Millis) {
        let method = attempt.method.as_str();
        self.delivery_ids.push(attempt.delivery_id);
        self.businesses.push(attempt.business_id.0);
        self.started.push(attempt.started_at);
        self.finished.push(attempt.finished_at);
        self.latencies.push(attempt.latency_ms);
        self.statuses.push(attempt.http_status.map(i32::from));
        self.outcomes.push(attempt.verdict.outcome_name());
        self.api_errors
            .push(serde_json::to_string(&attempt.api_errors).unwrap_or_else(|_| "[]".into()));
        self.errors.push(attempt.error.as_deref());
        self.counts_quota.push(attempt.counts_for_quota);
        self.methods.push(method);
        // The slot the claim took: kept from the answer's time when the
        // Market counted the call, else given back.
        if attempt.counts_for_quota {
            self.keep_tokens.push(attempt.claim_token);
            self.keep_deliveries.push(attempt.delivery_id);
            self.keep_businesses.push(attempt.business_id.0);
            self.keep_methods.push(method);
            self.keep_at.push(attempt.finished_at);
        } else {
            self.give_tokens.push(attempt.claim_token);
        }
        for (until, reason) in pauses_of(attempt) {
            self.pauses
                .push((attempt.business_id.0, method, until, reason.as_str()));
        }
        let (state, reason, next, delivered_at, counted) = attempt.outcome(now);
        self.states.push(state.as_str());
        self.reasons.push(reason);
        self.next_at.push(next);
        self.delivered_at.push(delivered_at);
        self.counted.push(counted);
        self.now.push(now);
        self.tokens.push(attempt.claim_token);
    }

    /// Whether no answer is in it.
    pub(super) fn is_empty(&self) -> bool {
        self.delivery_ids.is_empty()
    }

    /// The statements that store the answers before their deliveries'
    /// new states ([`UPDATES_SQL`] with [`Self::update_params`]), in the
    /// order they run, each with its parameters: the attempts, the quota
    /// slots kept and given back, the pauses.
    pub(super) fn statements(&self) -> Vec<(&'static str, Vec<&(dyn ToSql + Sync)>)> {
        let mut statements: Vec<(&'static str, Vec<&(dyn ToSql + Sync)>)> = vec![(
            ATTEMPTS_SQL,
            vec![
                &self.delivery_ids,
                &self.businesses,
                &self.started,
                &self.finished,
                &self.latencies,
                &self.statuses,
                &self.outcomes,
                &self.api_errors,
                &self.errors,
                &self.counts_quota,
                &self.methods,
            ],
        )];
        if !self.keep_tokens.is_empty() {
            statements.push((
                SLOTS_KEEP_SQL,
                vec![
                    &self.keep_tokens,
                    &self.keep_deliveries,
                    &self.keep_businesses,
                    &self.keep_methods,
                    &self.keep_at,
                ],
            ));
        }
        if !self.give_tokens.is_empty() {
            statements.push((SLOTS_GIVE_SQL, vec![&self.give_tokens]));
        }
        for (business, method, until, reason) in &self.pauses {
            statements.push((PAUSE_SQL, vec![business, method, until, reason]));
        }
        statements
    }

    pub(super) fn update_params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.delivery_ids,
            &self.states,
            &self.reasons,
            &self.next_at,
            &self.delivered_at,
            &self.counted,
            &self.now,
            &self.tokens,
        ]
    }
}

/// The businesses whose deliveries the event writes (held shared while it
/// is written, see the module docs of `postgres.rs`).
pub(super) fn event_businesses(event: &NewEvent) -> Vec<i64> {
    let mut businesses: Vec<i64> = event
        .deliveries
        .iter()
        .filter_map(|d| match &d.rendered {
            Ok(m) => Some(m.business_id.0),
            Err(f) => f.business_id.map(|b| b.0),
        })
        .collect();
    businesses.sort_unstable();
    businesses.dedup();
    businesses
}

/// The subject lock's key of an event that may arrive out of order: two
/// notifications about one subject accepted at once (by two instances, or
/// in one batch) must be stored one after the other, so the later-stored
/// one sees the other.
pub(super) fn event_subject(event: &NewEvent) -> Option<String> {
    event
        .ordering
        .as_ref()
        .map(|o| format!("{}\n{}", event.source, o.subject))
}

/// Takes the businesses' locks shared and the subjects' locks, each kind
/// in the order of its lock keys, all businesses before any subject: every
/// transaction that holds several of these locks takes them in this one
/// order, so two of them never wait for each other in a circle.
pub(super) async fn lock_for_events(
    c: &impl GenericClient,
    businesses: &[i64],
    subjects: &[String],
) -> StoreResult<()> {
    if !businesses.is_empty() {
        c.execute(
            &cached(c, LOCK_SHARED_SQL).await?,
            &[&BUSINESS_LOCK, &businesses],
        )
        .await
        .map_err(db_error)?;
    }
    if !subjects.is_empty() {
        let sql = "SELECT pg_advisory_xact_lock($1, k) FROM (
                       SELECT DISTINCT hashtext(s) AS k FROM unnest($2::text[]) AS s ORDER BY k) AS keys";
        c.execute(&cached(c, sql).await?, &[&SUBJECT_LOCK, &subjects])
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

/// Tells every listening process, on commit, that these businesses (`None`:
/// some business) have work due: one statement, one notification each.
pub(super) async fn announce_all(
    c: &impl GenericClient,
    businesses: &mut Vec<Option<i64>>,
) -> StoreResult<()> {
    businesses.sort_unstable();
    businesses.dedup();
    if businesses.is_empty() {
        return Ok(());
    }
    let payloads: Vec<String> = businesses
        .iter()
        .map(|b| b.map(|b| b.to_string()).unwrap_or_default())
        .collect();
    c.execute(
        &cached(c, NOTIFY_SQL).await?,
        &[&listen::CHANNEL, &payloads],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Writes the event and its deliveries (its locks held), or reads the
/// stored one when its key is known. Returns the answer and the businesses
/// it gave work to.
pub(super) async fn write_event(
    c: &impl GenericClient,
    event: &NewEvent,
) -> StoreResult<(Inserted, Vec<Option<i64>>)> {
    let insert = cached(
        c,
        "INSERT INTO events (source, external_id, event_type, payload, received_at,
             business_id, subject, happened_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (source, external_id) DO NOTHING
         RETURNING id",
    )
    .await?;
    let inserted = c
        .query_opt(
            &insert,
            &[
                &event.source,
                &event.external_id,
                &event.event_type,
                &event.payload,
                &event.received_at,
                &event.business_id.map(|b| b.0),
                &event.ordering.as_ref().map(|o| o.subject.as_str()),
                &event.ordering.as_ref().map(|o| o.happened_at),
            ],
        )
        .await
        .map_err(db_error)?;
    let Some(inserted) = inserted else {
        // Another instance may have inserted it a moment ago: ON CONFLICT
        // waited for its commit, and this statement's snapshot sees it.
        let stored = event_by_key(c, &event.source, &event.external_id)
            .await?
            .ok_or_else(|| StoreError::Database("duplicate event vanished".into()))?;
        return Ok((Inserted::Duplicate(stored), Vec::new()));
    };
    let event_id: i64 = inserted.get(0);
    let superseded = match &event.ordering {
        Some(o) => later_news(c, &event.source, o, event_id).await?,
        None => None,
    };
    let stmt = cached(
        c,
        "INSERT INTO deliveries (event_id, route, template, business_id, chat_id, text, state,
             reason, created_at, queued_at, next_attempt_at, updated_at,
             context_type, context_id, conversation)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $9, $9, $10, $11, $12)
         RETURNING id",
    )
    .await?;
    let mut deliveries = Vec::with_capacity(event.deliveries.len());
    // The businesses this event gives work to, to wake other instances.
    let mut due = Vec::new();
    for d in &event.deliveries {
        let (business, text, state, reason) = match (&d.rendered, &superseded) {
            (Ok(m), Some(why)) => (
                Some(m.business_id.0),
                Some(m.text.as_str()),
                DeliveryState::Cancelled,
                Some(why.as_str()),
            ),
            (Ok(m), None) => (
                Some(m.business_id.0),
                Some(m.text.as_str()),
                DeliveryState::Queued,
                None,
            ),
            (Err(f), _) => (
                f.business_id.map(|b| b.0),
                None,
                DeliveryState::Failed,
                Some(f.reason.as_str()),
            ),
        };
        let at = match &d.rendered {
            Ok(m) => Addressed::find(c, m.business_id, m.target).await?,
            Err(f) => match (f.business_id, f.target) {
                (Some(business), Some(target)) => Addressed::find(c, business, target).await?,
                _ => Addressed::default(),
            },
        };
        let row = c
            .query_one(
                &stmt,
                &[
                    &event_id,
                    &d.route,
                    &d.template,
                    &business,
                    &at.chat,
                    &text,
                    &state.as_str(),
                    &reason,
                    &event.received_at,
                    &at.context_type,
                    &at.context_id,
                    &at.conversation,
                ],
            )
            .await
            .map_err(db_error)?;
        deliveries.push(DeliverySummary {
            id: row.get(0),
            route: d.route.clone(),
            state,
        });
        if state == DeliveryState::Queued {
            due.push(business);
        }
    }
    Ok((Inserted::New(event.stored(event_id, deliveries)), due))
}

/// The event in a transaction of its own.
pub(super) async fn insert_alone(client: &mut Object, event: &NewEvent) -> StoreResult<Inserted> {
    let tx = client.transaction().await.map_err(db_error)?;
    let subjects: Vec<String> = event_subject(event).into_iter().collect();
    lock_for_events(&tx, &event_businesses(event), &subjects).await?;
    let (inserted, mut due) = write_event(&tx, event).await?;
    announce_all(&tx, &mut due).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(inserted)
}

/// Whether the record must run alone: `chats/new`'s answer moves
/// deliveries between conversations, under the business's exclusive lock
/// (not while a claim of the business is choosing heads), which a batch
/// holding the business's shared lock for an insert could not take safely.
pub(super) fn record_needs_lock(attempt: &Attempt) -> bool {
    matches!(attempt.verdict, Verdict::ChatFound { .. })
}

/// Stores the attempt and moves its delivery to the verdict's state, if it
/// still carries the attempt's claim token. Returns the business to wake
/// other instances for, when the delivery changed.
pub(super) async fn write_record(
    c: &impl GenericClient,
    attempt: &Attempt,
    now: Millis,
) -> StoreResult<Option<Option<i64>>> {
    let mut columns = RecordColumns::default();
    columns.push(attempt, now);
    for (sql, params) in columns.statements() {
        c.execute(&cached(c, sql).await?, &params)
            .await
            .map_err(db_error)?;
    }
    if let Verdict::ChatFound { context, chat } = attempt.verdict {
        remember_chat(c, attempt.business_id, context, chat, now).await?;
    }
    let changed = c
        .query(&cached(c, UPDATES_SQL).await?, &columns.update_params())
        .await
        .map_err(db_error)?;
    if changed.is_empty() {
        tracing::warn!(
            delivery = attempt.delivery_id,
            "an answer came after the delivery's lease was taken over; recorded as an attempt only"
        );
        return Ok(None);
    }
    // A request slot is free again, and the delivery is back in the queue
    // or the next of its conversation is now first: work for any instance.
    Ok(Some(Some(attempt.business_id.0)))
}

/// The attempt in a transaction of its own.
pub(super) async fn record_alone(
    client: &mut Object,
    attempt: &Attempt,
    now: Millis,
) -> StoreResult<()> {
    let tx = client.transaction().await.map_err(db_error)?;
    if record_needs_lock(attempt) {
        lock_business(&tx, attempt.business_id.0, true).await?;
    }
    let mut due: Vec<Option<i64>> = write_record(&tx, attempt, now).await?.into_iter().collect();
    announce_all(&tx, &mut due).await?;
    tx.commit().await.map_err(db_error)
}
