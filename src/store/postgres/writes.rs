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
pub(super) const ATTEMPT_SQL: &str = "INSERT INTO attempts (delivery_id, business_id, started_at,
    finished_at, latency_ms, http_status, outcome, api_errors, error, counts_quota, method)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
/// The claim's quota slot moved to the answer's time, or a new one if it is gone.
pub(super) const SLOT_KEEP_SQL: &str = "WITH moved AS (
        UPDATE quota_slots SET taken_at = $5 WHERE claim_token = $1 RETURNING 1)
    INSERT INTO quota_slots (claim_token, delivery_id, business_id, method, taken_at)
    SELECT -nextval('claim_tokens'), $2, $3, $4, $5
    WHERE NOT EXISTS (SELECT 1 FROM moved)";
pub(super) const SLOT_GIVE_SQL: &str = "DELETE FROM quota_slots WHERE claim_token = $1";
/// The later pause wins, with its reason.
pub(super) const PAUSE_SQL: &str =
    "INSERT INTO method_pauses (business_id, method, until_at, reason)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (business_id, method) DO UPDATE SET
        reason = CASE WHEN EXCLUDED.until_at > method_pauses.until_at
            THEN EXCLUDED.reason ELSE method_pauses.reason END,
        until_at = GREATEST(method_pauses.until_at, EXCLUDED.until_at)";
pub(super) const UPDATE_SQL: &str = "UPDATE deliveries SET state = $2,
        reason = CASE WHEN $2 = 'delivered' THEN NULL ELSE COALESCE($3, reason) END,
        next_attempt_at = $4, delivered_at = $5, attempts = attempts + $6,
        lease_until = NULL, updated_at = $7
    WHERE id = $1 AND claim_token = $8";

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
    let errors = serde_json::to_string(&attempt.api_errors).unwrap_or_else(|_| "[]".into());
    let insert = cached(c, ATTEMPT_SQL).await?;
    c.execute(
        &insert,
        &[
            &attempt.delivery_id,
            &attempt.business_id.0,
            &attempt.started_at,
            &attempt.finished_at,
            &attempt.latency_ms,
            &attempt.http_status.map(i32::from),
            &attempt.verdict.outcome_name(),
            &errors,
            &attempt.error,
            &attempt.counts_for_quota,
            &attempt.method.as_str(),
        ],
    )
    .await
    .map_err(db_error)?;
    if let Verdict::ChatFound { context, chat } = attempt.verdict {
        remember_chat(c, attempt.business_id, context, chat, now).await?;
    }
    // The slot the claim took: kept from the answer's time when the
    // Market counted the call (a new one if it is gone), else given back.
    if attempt.counts_for_quota {
        let slot = cached(c, SLOT_KEEP_SQL).await?;
        c.execute(
            &slot,
            &[
                &attempt.claim_token,
                &attempt.delivery_id,
                &attempt.business_id.0,
                &attempt.method.as_str(),
                &attempt.finished_at,
            ],
        )
        .await
        .map_err(db_error)?;
    } else {
        let give_back = cached(c, SLOT_GIVE_SQL).await?;
        c.execute(&give_back, &[&attempt.claim_token])
            .await
            .map_err(db_error)?;
    }
    for (until, reason) in pauses_of(attempt) {
        let pause = cached(c, PAUSE_SQL).await?;
        c.execute(
            &pause,
            &[
                &attempt.business_id.0,
                &attempt.method.as_str(),
                &until,
                &reason.as_str(),
            ],
        )
        .await
        .map_err(db_error)?;
    }
    let (state, reason, next, delivered_at, counted) = attempt.outcome(now);
    let update = cached(c, UPDATE_SQL).await?;
    let changed = c
        .execute(
            &update,
            &[
                &attempt.delivery_id,
                &state.as_str(),
                &reason,
                &next,
                &delivered_at,
                &counted,
                &now,
                &attempt.claim_token,
            ],
        )
        .await
        .map_err(db_error)?;
    if changed == 0 {
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
