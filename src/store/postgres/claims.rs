//! Claims: what a business may start now (its `sending` rows against
//! `max_in_flight`, each method's quota slots in the window and stored
//! pause, whether it is held) and its due heads leased, in one statement,
//! then their quota slots written, all under the business's exclusive
//! lock (see the module docs of `postgres.rs`).
//!
//! A dispatcher round (`claim_round`) claims for all its businesses in one
//! transaction: their locks taken in one statement in the fixed order of
//! `writes::lock_for_events` (so two rounds, or a round and a batch of
//! inserts, never wait for each other in a circle), the businesses'
//! statements sent together (pipelined on the connection), one statement
//! for every quota slot, the `next_due` look-ups, one commit.
//!
//! Before that, a round skips the businesses another process is claiming
//! for at that moment (each round holds a second, claim-only lock per
//! business, tried without waiting): otherwise two instances' rounds, each
//! over every business with work, would queue behind each other and hold
//! up the inserts queued behind them. A skipped business is looked at
//! again after [`BUSY_RETRY_MS`] (the other process's sends, as they end,
//! wake this one too).

use deadpool_postgres::GenericClient;

use super::writes::cached;
use super::*;

/// When to look again at a business another process was claiming for.
const BUSY_RETRY_MS: Millis = 20;

/// Takes the businesses' exclusive locks in the order of their lock keys.
async fn lock_exclusive(c: &impl GenericClient, businesses: &[i64]) -> StoreResult<()> {
    let sql = "SELECT pg_advisory_xact_lock($1, k) FROM (
                   SELECT DISTINCT hashint8(b) AS k FROM unnest($2::int8[]) AS b ORDER BY k) AS keys";
    c.execute(&cached(c, sql).await?, &[&BUSINESS_LOCK, &businesses])
        .await
        .map_err(db_error)?;
    Ok(())
}

/// The quota slots of method `$m` that count now: those of the window
/// (after `$4`) and, while its call is still in flight, a slot up to a
/// lease older (after `$5`). The window's whole minutes are added up from
/// `quota_counts` (PostgreSQL migration 8); only the slots of its first,
/// partial minute and the in-flight band are counted one by one.
macro_rules! slots_in_window {
    ($m:literal) => {
        concat!(
            "((SELECT COALESCE(SUM(n), 0)::int8 FROM quota_counts
               WHERE business_id = $1 AND method = ",
            $m,
            " AND minute > quota_minute($4))
            + (SELECT COUNT(*) FROM quota_slots q
               WHERE q.business_id = $1 AND q.method = ",
            $m,
            "
                 AND q.taken_at > $4 AND q.taken_at < quota_minute($4) + 60000)
            + (SELECT COUNT(*) FROM quota_slots q
               WHERE q.business_id = $1 AND q.method = ",
            $m,
            " AND q.taken_at > $5 AND q.taken_at <= $4
                 AND EXISTS (SELECT 1 FROM deliveries d WHERE d.id = q.delivery_id
                             AND d.claim_token = q.claim_token AND d.state = 'sending')))"
        )
    };
}

/// In one statement: the business's `sending` deliveries, whether it has
/// held ones, and for `chats/new` ($2) and sends ($3) the quota slots that
/// count and the pause. A slot counts from its time (the claim's, then the
/// answer's) for one window; and, while its call is still in flight, for
/// as long as its lease: the Market counts a call when the call arrives,
/// which may be later than the claim, by up to the request timeout
/// (shorter than the lease). A slot older than window + lease is over
/// whatever became of it.
const ROOM: &str = concat!(
    "SELECT
    (SELECT COUNT(*) FROM deliveries WHERE business_id = $1 AND state = 'sending') AS sending,
    EXISTS (SELECT 1 FROM deliveries WHERE business_id = $1 AND state = 'held') AS held,
    ",
    slots_in_window!("$2"),
    " AS lookups_used,
    (SELECT until_at FROM method_pauses WHERE business_id = $1 AND method = $2) AS lookups_paused,
    ",
    slots_in_window!("$3"),
    " AS sends_used,
    (SELECT until_at FROM method_pauses WHERE business_id = $1 AND method = $3) AS sends_paused"
);

/// What the business may start now, and its due heads leased, in one
/// statement (one round trip, where reading the room first took two): the
/// room of [`ROOM`] ($1 to $5) against the limits ($6 now, $7 lease end,
/// $8 the free request slots asked for, $9 `max_in_flight`, $10 and $11
/// the `chats/new` and send limits, $12 and $13 the look-ups and sends
/// asked for); nothing while the business has held deliveries (another
/// instance holds it: only its probe may call the Market). Heads whose
/// chat must be found first go before sends, within the free slots.
fn claim_sql() -> String {
    let heads = |lookups: bool, limit: &str| {
        format!(
            "SELECT d.id FROM deliveries d
             WHERE d.state = 'queued' AND d.business_id = $1 AND d.next_attempt_at <= $6
               AND d.chat_id IS {} NULL AND {HEAD}
             ORDER BY d.next_attempt_at, d.id
             LIMIT (SELECT CASE WHEN held THEN 0 ELSE GREATEST({limit}, 0) END FROM room)
             FOR UPDATE SKIP LOCKED",
            if lookups { "" } else { "NOT" }
        )
    };
    format!(
        "WITH found AS ({ROOM}),
         room AS (
             SELECT held,
                 LEAST($8::int8, $9::int8 - sending) AS total,
                 CASE WHEN lookups_paused > $6 THEN 0 ELSE LEAST($12::int8, $10::int8 - lookups_used) END AS lookups,
                 CASE WHEN sends_paused > $6 THEN 0 ELSE LEAST($13::int8, $11::int8 - sends_used) END AS sends
             FROM found),
         lookups AS ({}),
         sends AS ({})
         UPDATE deliveries u SET state = 'sending', lease_until = $7, updated_at = $6,
             claim_token = nextval('claim_tokens')
         FROM (SELECT id FROM lookups UNION ALL SELECT id FROM sends) due WHERE u.id = due.id
         RETURNING {CLAIMED_COLUMNS}",
        heads(true, "LEAST(total, lookups)"),
        heads(false, "LEAST(total - (SELECT COUNT(*) FROM lookups), sends)"),
    )
}

/// Leases what the business may start now (its lock held); the quota
/// slots are left to [`take_slots`]. `held`: the probe of a business whose
/// deliveries are held, one held delivery if a request slot is free.
async fn claim_in(
    c: &impl GenericClient,
    business: BusinessId,
    now: Millis,
    lease_until: Millis,
    limits: ClaimLimits,
    held: bool,
) -> StoreResult<Vec<Claimed>> {
    static CLAIM: std::sync::LazyLock<String> = std::sync::LazyLock::new(claim_sql);
    let caps = limits.caps;
    let lease_ms = (lease_until - now).max(0);
    let (lookup, send) = (
        MarketMethod::CreateChat.as_str(),
        MarketMethod::SendMessage.as_str(),
    );
    let (window_start, lease_window_start) =
        (now - caps.window_ms, now - caps.window_ms - lease_ms);
    let found: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
        &business.0,
        &lookup,
        &send,
        &window_start,
        &lease_window_start,
    ];
    if held {
        let sending: i64 = c
            .query_one(&cached(c, ROOM).await?, &found)
            .await
            .map_err(db_error)?
            .get("sending");
        let total = limits
            .total
            .min((caps.max_in_flight as i64 - sending).max(0) as usize);
        if total == 0 {
            return Ok(Vec::new());
        }
        let sql = format!(
            "WITH due AS (
                SELECT id FROM deliveries
                WHERE state = 'held' AND business_id = $1
                ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE deliveries u SET state = 'sending', lease_until = $3,
                 updated_at = $4, claim_token = nextval('claim_tokens')
             FROM due WHERE u.id = due.id
             RETURNING {CLAIMED_COLUMNS}"
        );
        let rows = c
            .query(
                &cached(c, &sql).await?,
                &[&business.0, &(total as i64), &lease_until, &now],
            )
            .await
            .map_err(db_error)?;
        return Ok(rows.iter().map(claimed_row).collect());
    }
    let limits_now: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
        &now,
        &lease_until,
        &(limits.total as i64),
        &(caps.max_in_flight as i64),
        &(caps.lookup_limit as i64),
        &(caps.send_limit as i64),
        &(limits.chat_lookups as i64),
        &(limits.sends as i64),
    ];
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        found.iter().chain(&limits_now).copied().collect();
    let rows = c
        .query(&cached(c, &CLAIM).await?, &params)
        .await
        .map_err(db_error)?;
    let mut claimed: Vec<Claimed> = rows.iter().map(claimed_row).collect();
    // Look-ups first, each kind in id order (as two statements gave them).
    claimed.sort_by_key(|d| (d.chat_id.is_some(), d.id));
    Ok(claimed)
}

/// Each claimed call takes its quota slot now, in one statement: a crash
/// before the answer is recorded cannot lose it.
async fn take_slots<'a>(
    c: &impl GenericClient,
    stmt: &tokio_postgres::Statement,
    claimed: impl Iterator<Item = &'a Claimed>,
    now: Millis,
) -> StoreResult<()> {
    let (mut tokens, mut ids, mut businesses, mut methods) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for d in claimed {
        tokens.push(d.claim_token);
        ids.push(d.id);
        businesses.push(d.business_id.0);
        methods.push(
            if d.chat_id.is_some() {
                MarketMethod::SendMessage
            } else {
                MarketMethod::CreateChat
            }
            .as_str(),
        );
    }
    if tokens.is_empty() {
        return Ok(());
    }
    c.execute(stmt, &[&tokens, &ids, &businesses, &methods, &now])
        .await
        .map_err(db_error)?;
    Ok(())
}

const SLOTS: &str =
    "INSERT INTO quota_slots (claim_token, delivery_id, business_id, method, taken_at)
    SELECT t, d, b, m, $5
    FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::text[]) AS s(t, d, b, m)";

/// See `Store::next_due`. A pause another instance stored blocks this
/// one's claims without its dispatcher knowing: it must wake when the
/// pause ends.
fn next_due_sql() -> String {
    format!(
        "SELECT LEAST(
            (SELECT MIN(d.next_attempt_at) FROM deliveries d
             WHERE d.state = 'queued' AND d.business_id = $1 AND d.next_attempt_at > $2
               AND {HEAD}),
            (SELECT MIN(until_at) FROM method_pauses
             WHERE business_id = $1 AND until_at > $2))"
    )
}

/// See `Store::next_due`.
pub(super) async fn next_due_in(
    c: &impl GenericClient,
    business: BusinessId,
    now: Millis,
) -> StoreResult<Option<Millis>> {
    let stmt = cached(c, &next_due_sql()).await?;
    next_due_with(c, &stmt, business, now).await
}

async fn next_due_with(
    c: &impl GenericClient,
    stmt: &tokio_postgres::Statement,
    business: BusinessId,
    now: Millis,
) -> StoreResult<Option<Millis>> {
    Ok(c.query_one(stmt, &[&business.0, &now])
        .await
        .map_err(db_error)?
        .get(0))
}

/// See `Store::claim`.
pub(super) async fn claim(
    client: &mut Object,
    business: BusinessId,
    now: Millis,
    lease_until: Millis,
    limits: ClaimLimits,
    held: bool,
) -> StoreResult<Vec<Claimed>> {
    let tx = client.transaction().await.map_err(db_error)?;
    lock_exclusive(&tx, &[business.0]).await?;
    let claimed = claim_in(&tx, business, now, lease_until, limits, held).await?;
    take_slots(&tx, &cached(&tx, SLOTS).await?, claimed.iter(), now).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(claimed)
}

/// The round's businesses no other process is claiming for, their
/// claim-only locks taken without waiting (in any order: trying never
/// waits), then their business locks, waiting, in the order of their keys.
const TAKE: &str = "SELECT b, pg_advisory_xact_lock($2, k) FROM (
        SELECT b, hashint8(b) AS k FROM unnest($3::int8[]) AS b
        WHERE pg_try_advisory_xact_lock($1, hashint8(b))
        ORDER BY k OFFSET 0) AS free";

/// See `Store::claim_round`: one transaction for the round, in three round
/// trips: BEGIN with the locks; each business's claim (what it may start
/// and its heads, one statement each); the quota slots, the `next_due`
/// look-ups and COMMIT. The statements of each step go together.
pub(super) async fn claim_round(
    client: &mut Object,
    wanted: &[(BusinessId, ClaimLimits)],
    now: Millis,
    lease_until: Millis,
) -> StoreResult<Vec<RoundClaim>> {
    // Prepared before anything is sent: a statement prepared while a step
    // is sent would reach the server after that step's COMMIT.
    let take = cached(&*client, TAKE).await?;
    let slots = cached(&*client, SLOTS).await?;
    let next_due = cached(&*client, &next_due_sql()).await?;
    let c: &Object = client;
    let round = round_in(c, &take, &slots, &next_due, wanted, now, lease_until).await;
    if round.is_err() && !c.is_closed() {
        // Whatever failed, the transaction must not outlive the round.
        let _ = c.batch_execute("ROLLBACK").await;
    }
    round
}

#[allow(clippy::too_many_arguments)]
async fn round_in(
    c: &Object,
    take: &tokio_postgres::Statement,
    slots: &tokio_postgres::Statement,
    next_due: &tokio_postgres::Statement,
    wanted: &[(BusinessId, ClaimLimits)],
    now: Millis,
    lease_until: Millis,
) -> StoreResult<Vec<RoundClaim>> {
    let businesses: Vec<i64> = wanted.iter().map(|(b, _)| b.0).collect();
    let (begun, free) = futures_util::future::join(
        c.batch_execute("BEGIN"),
        c.query(take, &[&CLAIM_LOCK, &BUSINESS_LOCK, &businesses]),
    )
    .await;
    begun.map_err(db_error)?;
    let free: std::collections::HashSet<i64> =
        free.map_err(db_error)?.iter().map(|r| r.get(0)).collect();
    let mine: Vec<(BusinessId, ClaimLimits)> = wanted
        .iter()
        .filter(|(b, _)| free.contains(&b.0))
        .copied()
        .collect();
    let claims = futures_util::future::join_all(
        mine.iter()
            .map(|(business, limits)| claim_in(c, *business, now, lease_until, *limits, false)),
    )
    .await
    .into_iter()
    .collect::<StoreResult<Vec<_>>>()?;
    // Sent in this order (each when first polled); if one fails, the
    // COMMIT rolls back, and the round fails.
    let (slotted, next, committed) = futures_util::future::join3(
        take_slots(c, slots, claims.iter().flatten(), now),
        futures_util::future::join_all(mine.iter().zip(&claims).map(
            |((business, limits), claimed)| async move {
                match claimed.len() < limits.total {
                    true => next_due_with(c, next_due, *business, now).await,
                    false => Ok(None),
                }
            },
        )),
        c.batch_execute("COMMIT"),
    )
    .await;
    slotted?;
    let mut taken = std::collections::HashMap::with_capacity(mine.len());
    for (((business, _), claimed), next_due) in mine.iter().zip(claims).zip(next) {
        taken.insert(
            business.0,
            RoundClaim {
                claimed,
                next_due: next_due?,
            },
        );
    }
    committed.map_err(db_error)?;
    Ok(wanted
        .iter()
        .map(|(business, _)| {
            taken.remove(&business.0).unwrap_or(RoundClaim {
                claimed: Vec::new(),
                next_due: Some(now + BUSY_RETRY_MS),
            })
        })
        .collect())
}
