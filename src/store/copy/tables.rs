//! The tables `store copy` moves, one batch at a time: read from SQLite in
//! key order after a cursor, written to PostgreSQL in one statement per
//! batch (`UNNEST` of column arrays) that skips rows already there
//! (`ON CONFLICT DO NOTHING`), so a batch repeated after an interruption
//! adds nothing twice. What changes on the way:
//! - a delivery SQLite still has `sending` is written `queued`, without its
//!   lease or claim token: the process that leased it is gone (the serve
//!   lock proves it), and `queued` is where its own restart would have put
//!   it once the lease ran out. The Market may have had the send, so it
//!   keeps a quota slot from its claim time, as a PostgreSQL claim keeps
//!   its slot through a crash; sending it again is the one repeat the
//!   delivery guarantee allows (a crash between send and record);
//! - claim tokens are dropped: they fence a lease, and no lease survives;
//! - every attempt the Market counted becomes a quota slot at its finish
//!   time (PostgreSQL counts the quota from `quota_slots`, SQLite from the
//!   attempts), so the hourly quota holds right after the move.

use rusqlite::{params, Connection};
use tokio_postgres::types::ToSql;

use super::super::postgres::db_error;
use super::super::{PostgresStore, StoreError, StoreResult};

/// Events are bodies of up to `server.max_body_bytes`: a batch stops
/// early once it holds this much, to bound the memory a batch takes.
const MAX_BATCH_BYTES: usize = 16 << 20;

/// The tables in the order they are copied (a row's references first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Events,
    Deliveries,
    Attempts,
    ChatContexts,
    MarketCampaigns,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Events,
        Table::Deliveries,
        Table::Attempts,
        Table::ChatContexts,
        Table::MarketCampaigns,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Events => "events",
            Table::Deliveries => "deliveries",
            Table::Attempts => "attempts",
            Table::ChatContexts => "chat_contexts",
            Table::MarketCampaigns => "market_campaigns",
        }
    }

    /// The key column rows are copied in the order of, for the tables whose
    /// key is one integer: a rerun starts after the target's highest.
    fn id_column(self) -> Option<&'static str> {
        match self {
            Table::Events | Table::Deliveries | Table::Attempts => Some("id"),
            Table::MarketCampaigns => Some("campaign_id"),
            // Text in the key: PostgreSQL's collation may order it unlike
            // SQLite, so a rerun starts over and skips what is there.
            Table::ChatContexts => None,
        }
    }

    /// Where a (re)run starts.
    pub fn start(self, store: &PostgresStore) -> StoreResult<Cursor> {
        let Some(column) = self.id_column() else {
            return Ok(Cursor::Context(i64::MIN, String::new(), i64::MIN));
        };
        let sql = format!("SELECT COALESCE(MAX({column}), 0) FROM {}", self.name());
        let max: i64 = store.run_sync(move |c| async move {
            Ok(c.query_one(&sql, &[]).await.map_err(db_error)?.get(0))
        })?;
        // Ids start at 1 and campaign ids are positive: 0 is before all.
        Ok(Cursor::Id(max))
    }

    pub fn count_sqlite(self, conn: &Connection) -> StoreResult<i64> {
        conn.query_row(&format!("SELECT COUNT(*) FROM {}", self.name()), [], |r| {
            r.get(0)
        })
        .map_err(sqlite_error)
    }

    pub fn count_postgres(self, store: &PostgresStore) -> StoreResult<i64> {
        let sql = format!("SELECT COUNT(*) FROM {}", self.name());
        store.run_sync(move |c| async move {
            Ok(c.query_one(&sql, &[]).await.map_err(db_error)?.get(0))
        })
    }

    /// Copies the next batch of up to `limit` rows after `cursor`.
    pub fn copy_batch(
        self,
        conn: &Connection,
        store: &PostgresStore,
        cursor: &Cursor,
        limit: usize,
    ) -> StoreResult<Step> {
        match self {
            Table::Events => events(conn, store, cursor.id(), limit),
            Table::Deliveries => deliveries(conn, store, cursor.id(), limit),
            Table::Attempts => attempts(conn, store, cursor.id(), limit),
            Table::ChatContexts => chat_contexts(conn, store, cursor, limit),
            Table::MarketCampaigns => market_campaigns(conn, store, cursor.id(), limit),
        }
    }
}

/// How far a table's copy got: the last key copied.
#[derive(Debug, Clone)]
pub enum Cursor {
    Id(i64),
    /// `(business_id, context_type, context_id)`.
    Context(i64, String, i64),
}

impl Cursor {
    fn id(&self) -> i64 {
        match self {
            Cursor::Id(id) => *id,
            Cursor::Context(..) => i64::MIN,
        }
    }
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct Step {
    /// Rows read from SQLite (0: the table is done).
    pub read: usize,
    /// Rows written (fewer than read when a rerun finds them there).
    pub inserted: u64,
    /// Deliveries that were `sending`, written `queued`.
    pub requeued: u64,
    /// Quota slots written.
    pub slots: u64,
    pub next: Option<Cursor>,
}

pub fn sqlite_error(e: rusqlite::Error) -> StoreError {
    StoreError::Database(format!("reading the SQLite database: {e}"))
}

/// Runs one `INSERT ... SELECT ... FROM UNNEST(...)` statement (in its own
/// transaction: a batch is committed or not at all) and returns its one
/// row of counts.
fn write(
    store: &PostgresStore,
    sql: &'static str,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
) -> StoreResult<Vec<i64>> {
    store.run_sync(move |mut client| async move {
        let tx = client.transaction().await.map_err(db_error)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let row = tx.query_one(sql, &refs).await.map_err(db_error)?;
        let counts = (0..row.len()).map(|i| row.get::<_, i64>(i)).collect();
        tx.commit().await.map_err(db_error)?;
        Ok(counts)
    })
}

fn events(conn: &Connection, store: &PostgresStore, after: i64, limit: usize) -> StoreResult<Step> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, source, external_id, event_type, payload, received_at, business_id,
                    subject, happened_at
             FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(sqlite_error)?;
    let mut rows = stmt
        .query(params![after, limit as i64])
        .map_err(sqlite_error)?;
    let (mut id, mut source, mut external_id, mut event_type, mut payload) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut received_at, mut business_id, mut subject, mut happened_at) =
        (vec![], vec![], vec![], vec![]);
    let mut bytes = 0;
    while let Some(r) = rows.next().map_err(sqlite_error)? {
        let body: String = r.get(4).map_err(sqlite_error)?;
        bytes += body.len();
        id.push(r.get::<_, i64>(0).map_err(sqlite_error)?);
        source.push(r.get::<_, String>(1).map_err(sqlite_error)?);
        external_id.push(r.get::<_, String>(2).map_err(sqlite_error)?);
        event_type.push(r.get::<_, String>(3).map_err(sqlite_error)?);
        payload.push(body);
        received_at.push(r.get::<_, i64>(5).map_err(sqlite_error)?);
        business_id.push(r.get::<_, Option<i64>>(6).map_err(sqlite_error)?);
        subject.push(r.get::<_, Option<String>>(7).map_err(sqlite_error)?);
        happened_at.push(r.get::<_, Option<i64>>(8).map_err(sqlite_error)?);
        if bytes >= MAX_BATCH_BYTES {
            break;
        }
    }
    let read = id.len();
    let Some(&last) = id.last() else {
        return Ok(Step::default());
    };
    let counts = write(
        store,
        "WITH ins AS (
            INSERT INTO events (id, source, external_id, event_type, payload, received_at,
                business_id, subject, happened_at)
            SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::bigint[], $7::bigint[], $8::text[], $9::bigint[])
            ON CONFLICT DO NOTHING RETURNING 1)
         SELECT COUNT(*) FROM ins",
        vec![
            Box::new(id),
            Box::new(source),
            Box::new(external_id),
            Box::new(event_type),
            Box::new(payload),
            Box::new(received_at),
            Box::new(business_id),
            Box::new(subject),
            Box::new(happened_at),
        ],
    )?;
    Ok(Step {
        read,
        inserted: counts[0] as u64,
        next: Some(Cursor::Id(last)),
        ..Step::default()
    })
}

fn deliveries(
    conn: &Connection,
    store: &PostgresStore,
    after: i64,
    limit: usize,
) -> StoreResult<Step> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, event_id, route, template, business_id, chat_id, text, state, reason,
                    attempts, created_at, queued_at, next_attempt_at, updated_at, delivered_at,
                    context_type, context_id, conversation
             FROM deliveries WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(sqlite_error)?;
    let mut rows = stmt
        .query(params![after, limit as i64])
        .map_err(sqlite_error)?;
    let mut ints: [Vec<i64>; 7] = Default::default();
    let mut opt_ints: [Vec<Option<i64>>; 4] = Default::default();
    let mut texts: [Vec<String>; 3] = Default::default();
    let mut opt_texts: [Vec<Option<String>>; 4] = Default::default();
    while let Some(r) = rows.next().map_err(sqlite_error)? {
        for (col, i) in [0, 1, 9, 10, 11, 12, 13].into_iter().zip(0..) {
            ints[i].push(r.get(col).map_err(sqlite_error)?);
        }
        for (col, i) in [4, 5, 14, 16].into_iter().zip(0..) {
            opt_ints[i].push(r.get(col).map_err(sqlite_error)?);
        }
        for (col, i) in [2, 3, 7].into_iter().zip(0..) {
            texts[i].push(r.get(col).map_err(sqlite_error)?);
        }
        for (col, i) in [6, 8, 15, 17].into_iter().zip(0..) {
            opt_texts[i].push(r.get(col).map_err(sqlite_error)?);
        }
    }
    let read = ints[0].len();
    let Some(&last) = ints[0].last() else {
        return Ok(Step::default());
    };
    let [id, event_id, attempts, created_at, queued_at, next_attempt_at, updated_at] = ints;
    let [business_id, chat_id, delivered_at, context_id] = opt_ints;
    let [route, template, state] = texts;
    let [text, reason, context_type, conversation] = opt_texts;
    let counts = write(
        store,
        "WITH input AS (
            SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bigint[],
                $6::bigint[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[],
                $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[], $16::text[],
                $17::bigint[], $18::text[])
            AS r(id, event_id, route, template, business_id, chat_id, text, state, reason,
                 attempts, created_at, queued_at, next_attempt_at, updated_at, delivered_at,
                 context_type, context_id, conversation)
         ),
         ins AS (
            INSERT INTO deliveries (id, event_id, route, template, business_id, chat_id, text,
                state, reason, attempts, created_at, queued_at, next_attempt_at, lease_until,
                updated_at, delivered_at, context_type, context_id, conversation, claim_token)
            SELECT id, event_id, route, template, business_id, chat_id, text,
                CASE WHEN state = 'sending' THEN 'queued' ELSE state END, reason, attempts,
                created_at, queued_at, next_attempt_at, NULL, updated_at, delivered_at,
                context_type, context_id, conversation, NULL
            FROM input ORDER BY id
            ON CONFLICT DO NOTHING
            RETURNING id, business_id, chat_id, updated_at
         ),
         requeued AS (
            SELECT ins.* FROM ins JOIN input USING (id) WHERE input.state = 'sending'
         ),
         slots AS (
            INSERT INTO quota_slots (claim_token, delivery_id, business_id, method, taken_at)
            SELECT -nextval('claim_tokens'), id, business_id,
                CASE WHEN chat_id IS NULL THEN 'chats/new' ELSE 'send' END, updated_at
            FROM requeued WHERE business_id IS NOT NULL
            RETURNING 1
         )
         SELECT (SELECT COUNT(*) FROM ins), (SELECT COUNT(*) FROM requeued),
                (SELECT COUNT(*) FROM slots)",
        vec![
            Box::new(id),
            Box::new(event_id),
            Box::new(route),
            Box::new(template),
            Box::new(business_id),
            Box::new(chat_id),
            Box::new(text),
            Box::new(state),
            Box::new(reason),
            Box::new(attempts),
            Box::new(created_at),
            Box::new(queued_at),
            Box::new(next_attempt_at),
            Box::new(updated_at),
            Box::new(delivered_at),
            Box::new(context_type),
            Box::new(context_id),
            Box::new(conversation),
        ],
    )?;
    Ok(Step {
        read,
        inserted: counts[0] as u64,
        requeued: counts[1] as u64,
        slots: counts[2] as u64,
        next: Some(Cursor::Id(last)),
    })
}

fn attempts(
    conn: &Connection,
    store: &PostgresStore,
    after: i64,
    limit: usize,
) -> StoreResult<Step> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, delivery_id, business_id, method, started_at, finished_at, latency_ms,
                    http_status, outcome, api_errors, error, counts_quota
             FROM attempts WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(sqlite_error)?;
    let mut rows = stmt
        .query(params![after, limit as i64])
        .map_err(sqlite_error)?;
    let mut ints: [Vec<i64>; 6] = Default::default();
    let mut texts: [Vec<String>; 3] = Default::default();
    let (mut http_status, mut error, mut counts_quota) = (vec![], vec![], vec![]);
    while let Some(r) = rows.next().map_err(sqlite_error)? {
        for (col, i) in [0, 1, 2, 4, 5, 6].into_iter().zip(0..) {
            ints[i].push(r.get(col).map_err(sqlite_error)?);
        }
        for (col, i) in [3, 8, 9].into_iter().zip(0..) {
            texts[i].push(r.get(col).map_err(sqlite_error)?);
        }
        http_status.push(r.get::<_, Option<i32>>(7).map_err(sqlite_error)?);
        error.push(r.get::<_, Option<String>>(10).map_err(sqlite_error)?);
        counts_quota.push(r.get::<_, bool>(11).map_err(sqlite_error)?);
    }
    let read = ints[0].len();
    let Some(&last) = ints[0].last() else {
        return Ok(Step::default());
    };
    let [id, delivery_id, business_id, started_at, finished_at, latency_ms] = ints;
    let [method, outcome, api_errors] = texts;
    let counts = write(
        store,
        "WITH ins AS (
            INSERT INTO attempts (id, delivery_id, business_id, method, started_at, finished_at,
                latency_ms, http_status, outcome, api_errors, error, counts_quota)
            SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::text[],
                $5::bigint[], $6::bigint[], $7::bigint[], $8::int[], $9::text[], $10::text[],
                $11::text[], $12::bool[])
            ON CONFLICT DO NOTHING
            RETURNING delivery_id, business_id, method, finished_at, counts_quota
         ),
         slots AS (
            INSERT INTO quota_slots (claim_token, delivery_id, business_id, method, taken_at)
            SELECT -nextval('claim_tokens'), delivery_id, business_id, method, finished_at
            FROM ins WHERE counts_quota
            RETURNING 1
         )
         SELECT (SELECT COUNT(*) FROM ins), (SELECT COUNT(*) FROM slots)",
        vec![
            Box::new(id),
            Box::new(delivery_id),
            Box::new(business_id),
            Box::new(method),
            Box::new(started_at),
            Box::new(finished_at),
            Box::new(latency_ms),
            Box::new(http_status),
            Box::new(outcome),
            Box::new(api_errors),
            Box::new(error),
            Box::new(counts_quota),
        ],
    )?;
    Ok(Step {
        read,
        inserted: counts[0] as u64,
        slots: counts[1] as u64,
        next: Some(Cursor::Id(last)),
        ..Step::default()
    })
}

fn chat_contexts(
    conn: &Connection,
    store: &PostgresStore,
    cursor: &Cursor,
    limit: usize,
) -> StoreResult<Step> {
    let Cursor::Context(b, t, c) = cursor else {
        return Err(StoreError::Database(
            "chat_contexts: a cursor of another table".into(),
        ));
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT business_id, context_type, context_id, chat_id, found_at FROM chat_contexts
             WHERE (business_id, context_type, context_id) > (?1, ?2, ?3)
             ORDER BY business_id, context_type, context_id LIMIT ?4",
        )
        .map_err(sqlite_error)?;
    let mut rows = stmt
        .query(params![b, t, c, limit as i64])
        .map_err(sqlite_error)?;
    let (mut business_id, mut context_type, mut context_id, mut chat_id, mut found_at) =
        (vec![], vec![], vec![], vec![], vec![]);
    while let Some(r) = rows.next().map_err(sqlite_error)? {
        business_id.push(r.get::<_, i64>(0).map_err(sqlite_error)?);
        context_type.push(r.get::<_, String>(1).map_err(sqlite_error)?);
        context_id.push(r.get::<_, i64>(2).map_err(sqlite_error)?);
        chat_id.push(r.get::<_, i64>(3).map_err(sqlite_error)?);
        found_at.push(r.get::<_, i64>(4).map_err(sqlite_error)?);
    }
    let read = business_id.len();
    let next = match (business_id.last(), context_type.last(), context_id.last()) {
        (Some(b), Some(t), Some(c)) => Cursor::Context(*b, t.clone(), *c),
        _ => return Ok(Step::default()),
    };
    let counts = write(
        store,
        "WITH ins AS (
            INSERT INTO chat_contexts (business_id, context_type, context_id, chat_id, found_at)
            SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
            ON CONFLICT DO NOTHING RETURNING 1)
         SELECT COUNT(*) FROM ins",
        vec![
            Box::new(business_id),
            Box::new(context_type),
            Box::new(context_id),
            Box::new(chat_id),
            Box::new(found_at),
        ],
    )?;
    Ok(Step {
        read,
        inserted: counts[0] as u64,
        next: Some(next),
        ..Step::default()
    })
}

fn market_campaigns(
    conn: &Connection,
    store: &PostgresStore,
    after: i64,
    limit: usize,
) -> StoreResult<Step> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT campaign_id, business_id, learnt_at FROM market_campaigns
             WHERE campaign_id > ?1 ORDER BY campaign_id LIMIT ?2",
        )
        .map_err(sqlite_error)?;
    let mut rows = stmt
        .query(params![after, limit as i64])
        .map_err(sqlite_error)?;
    let (mut campaign_id, mut business_id, mut learnt_at) = (vec![], vec![], vec![]);
    while let Some(r) = rows.next().map_err(sqlite_error)? {
        campaign_id.push(r.get::<_, i64>(0).map_err(sqlite_error)?);
        business_id.push(r.get::<_, i64>(1).map_err(sqlite_error)?);
        learnt_at.push(r.get::<_, i64>(2).map_err(sqlite_error)?);
    }
    let read = campaign_id.len();
    let Some(&last) = campaign_id.last() else {
        return Ok(Step::default());
    };
    let counts = write(
        store,
        "WITH ins AS (
            INSERT INTO market_campaigns (campaign_id, business_id, learnt_at)
            SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[])
            ON CONFLICT DO NOTHING RETURNING 1)
         SELECT COUNT(*) FROM ins",
        vec![
            Box::new(campaign_id),
            Box::new(business_id),
            Box::new(learnt_at),
        ],
    )?;
    Ok(Step {
        read,
        inserted: counts[0] as u64,
        next: Some(Cursor::Id(last)),
        ..Step::default()
    })
}
