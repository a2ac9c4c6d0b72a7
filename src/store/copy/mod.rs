//! `chatbridge store copy --from sqlite://FILE --to postgres://...`: moves
//! a whole SQLite store (events, deliveries, attempts, chat_contexts,
//! market_campaigns; not `store_probe`, SQLite's readiness row) into a
//! PostgreSQL database, for a user who outgrows one machine. What it
//! guarantees:
//! - nothing lost, nothing sent twice: every row keeps its id, state, text,
//!   reason, attempt history and times; each table's sequence is set past
//!   the copied ids before the first row goes in; `(source, event id)` is
//!   copied, so a repeated webhook is still a duplicate; the quota log goes
//!   along, so the hourly quota holds right after the move. A delivery
//!   left `sending` by a dead process goes back to the queue (see
//!   `tables`); `held` stays held;
//! - no `serve` on the file meanwhile: the copy holds the file's serve lock
//!   (`ServeLock`) from start to end, so it refuses to start while a serve
//!   runs, and a serve cannot start during it;
//! - never two stores mixed: the target must be empty (its schema made by
//!   the normal PostgreSQL migrations), except with `--resume`, which goes
//!   on only with a copy of this same file, unchanged since (recorded in
//!   `store_copies` with a summary of the file's contents); one copy at a
//!   time per target (an advisory lock); and `serve` refuses a target whose
//!   copy is not finished;
//! - restartable: each table is copied in key order in batches, each
//!   committed on its own and skipping rows already there, so a rerun with
//!   `--resume` goes on where the last one stopped;
//! - done means checked: it succeeds only when every table holds as many
//!   rows as in the file.
//!
//! It runs outside any async runtime: SQLite is read on this thread, and
//! PostgreSQL is written through the backend's own pool
//! (`PostgresStore::run_sync`).

mod tables;

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::postgres::db_error;
use super::{
    is_postgres, postgres_url_problem, redact_url, sqlite_path, PostgresStore, ServeLock,
    SqliteStore, StoreError, StoreResult,
};
use crate::settings::StorageSettings;
pub use tables::Table;
use tables::{sqlite_error, Cursor};

/// The advisory lock one copy into a database holds (first key of the
/// two-key form; postgres.rs uses 0x6362_0001..3).
const COPY_LOCK: i32 = 0x6362_0004;
/// How often a progress line is written while a table is copied.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What to copy where.
#[derive(Clone)]
pub struct CopyRequest {
    /// `sqlite://path/to/file.db`.
    pub from: String,
    /// `postgres://user@host:port/db` (a secret: may carry a password).
    pub to: String,
    /// Go on with an interrupted copy of the same file.
    pub resume: bool,
    /// Rows per batch (each one transaction).
    pub batch: usize,
}

impl std::fmt::Debug for CopyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyRequest")
            .field("from", &redact_url(&self.from))
            .field("to", &redact_url(&self.to))
            .field("resume", &self.resume)
            .field("batch", &self.batch)
            .finish()
    }
}

/// Why a copy did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The command line names something that cannot be copied.
    #[error("{0}")]
    Usage(String),
    /// Copying now would risk the data: a serve runs, the target holds
    /// other data, another copy runs.
    #[error("{0}")]
    Refused(String),
    /// A database failed during the copy; rerun with `--resume`.
    #[error("{0}")]
    Failed(String),
}

/// One table's count.
#[derive(Debug, Clone)]
pub struct TableCount {
    pub table: Table,
    /// Rows in the SQLite file (and now in the target).
    pub rows: i64,
    /// Rows this run wrote.
    pub copied: u64,
}

#[derive(Debug, Clone, Default)]
pub struct CopySummary {
    pub tables: Vec<TableCount>,
    /// Deliveries that were `sending` in the file, now `queued`.
    pub requeued: u64,
    /// Quota slots written (counted Market calls, and the requeued sends).
    pub quota_slots: u64,
    /// A finished copy of this file was found; nothing was written.
    pub already_done: bool,
}

/// Copies the store, reporting progress lines through `progress`.
pub fn copy(
    request: &CopyRequest,
    progress: &mut dyn FnMut(&str),
) -> Result<CopySummary, CopyError> {
    let from = redact_url(&request.from);
    let to = redact_url(&request.to);
    let path = sqlite_path(&request.from).ok_or_else(|| {
        CopyError::Usage(format!(
            "--from {from:?}: the source must be a SQLite database, sqlite://path/to/chatbridge.db \
             (the storage.url the SQLite serve used)"
        ))
    })?;
    if !is_postgres(&request.to) {
        return Err(CopyError::Usage(format!(
            "--to {to:?}: the target must be a PostgreSQL database, postgres://user@host:5432/database"
        )));
    }
    if let Some(problem) = postgres_url_problem(&request.to) {
        return Err(CopyError::Usage(format!("--to {to:?}: {problem}")));
    }
    if request.batch == 0 {
        return Err(CopyError::Usage("--batch must be at least 1".into()));
    }
    if !path.is_file() {
        return Err(CopyError::Usage(format!(
            "--from {from:?}: there is no SQLite database at {} (relative paths are relative to \
             the working directory, as in storage.url)",
            path.display()
        )));
    }
    // Held to the end: no serve changes the file under the copy.
    let _lock = ServeLock::acquire(path).map_err(|e| match e {
        StoreError::Conflict(_) => CopyError::Refused(format!(
            "cannot copy {}: another chatbridge is serving it; stop it first (the copy must \
             see the file at rest, and no serve may start until the copy is done)",
            path.display()
        )),
        e => CopyError::Refused(format!("cannot copy {}: {}", path.display(), plain(e))),
    })?;
    // The file's schema brought up to this version's, as serve would.
    drop(
        SqliteStore::open(path).map_err(|e| {
            CopyError::Failed(format!("cannot open {}: {}", path.display(), plain(e)))
        })?,
    );
    let source = open_source(path)?;
    let fingerprint = fingerprint(&source).map_err(failed)?;
    let target = PostgresStore::open(&StorageSettings {
        url: request.to.clone(),
        // One connection: it holds the copy's advisory lock throughout.
        pool_size: 1,
        connect_timeout_secs: 10,
        ..StorageSettings::default()
    })
    .map_err(|e| match e {
        // It holds tables of something else: running again changes nothing.
        StoreError::Conflict(why) => CopyError::Refused(format!("the target {to}: {why}")),
        e => CopyError::Failed(format!("cannot open the target {to}: {}", plain(e))),
    })?;
    take_copy_lock(&target, &to)?;
    let source_name = path.display().to_string();
    match prepare_target(&target, &source_name, &fingerprint, request.resume, &to)? {
        Prepared::AlreadyDone => {
            let mut summary = CopySummary {
                already_done: true,
                ..CopySummary::default()
            };
            for table in Table::ALL {
                summary.tables.push(TableCount {
                    table,
                    rows: table.count_postgres(&target).map_err(failed)?,
                    copied: 0,
                });
            }
            return Ok(summary);
        }
        Prepared::Fresh | Prepared::Resumed => {}
    }
    set_sequences(&source, &target).map_err(failed)?;
    let mut summary = CopySummary::default();
    for table in Table::ALL {
        let rows = table.count_sqlite(&source).map_err(failed)?;
        let copied = copy_table(table, rows, &source, &target, request.batch, &mut summary, progress)
            .map_err(|e| {
                CopyError::Failed(format!(
                    "copying {}: {}; what was copied is kept: run the same command with --resume to go on",
                    table.name(),
                    plain(e)
                ))
            })?;
        summary.tables.push(TableCount {
            table,
            rows,
            copied,
        });
    }
    for count in &summary.tables {
        let there = count.table.count_postgres(&target).map_err(failed)?;
        if there != count.rows {
            return Err(CopyError::Failed(format!(
                "{}: {} rows in {} but {there} in the target {to}; the copy is not marked finished \
                 (was something else writing to the target?)",
                count.table.name(),
                count.rows,
                path.display()
            )));
        }
    }
    // Again at the end: the same values unless rows came from elsewhere.
    set_sequences(&source, &target).map_err(failed)?;
    target
        .run_sync(|c| async move {
            c.execute(
                "UPDATE store_copies SET finished_at = $1 WHERE finished_at IS NULL",
                &[&now_ms()],
            )
            .await
            .map_err(db_error)
        })
        .map_err(failed)?;
    Ok(summary)
}

/// `serve` on a database whose copy from SQLite is not finished would send
/// from half a queue and take ids the copy still needs: refused.
pub(super) fn refuse_unfinished(store: &PostgresStore) -> StoreResult<()> {
    let unfinished: Option<String> = store.run_sync(|c| async move {
        Ok(c.query_opt(
            "SELECT source FROM store_copies WHERE finished_at IS NULL LIMIT 1",
            &[],
        )
        .await
        .map_err(db_error)?
        .map(|r| r.get(0)))
    })?;
    match unfinished {
        None => Ok(()),
        Some(source) => Err(StoreError::Database(format!(
            "a copy of the SQLite database {source} into this database is not finished; run \
             `chatbridge store copy --from sqlite://{source} --to <this database> --resume` to \
             finish it, then start serve"
        ))),
    }
}

fn failed(e: StoreError) -> CopyError {
    CopyError::Failed(plain(e))
}

/// The error's text without the "database error:" every store error has.
fn plain(e: StoreError) -> String {
    match e {
        StoreError::Database(text)
        | StoreError::Unavailable(text)
        | StoreError::Conflict(text)
        | StoreError::NotFound(text) => text,
        StoreError::Closed => "the store closed".into(),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn open_source(path: &Path) -> Result<Connection, CopyError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| CopyError::Failed(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(30))
        .map_err(|e| CopyError::Failed(e.to_string()))?;
    Ok(conn)
}

/// What the file holds, in brief: row counts, highest ids and latest
/// change times. Any write a serve makes changes it (every write sets a
/// time from the clock, adds a row or deletes some), so a resumed copy can
/// tell that the file is still the one it began with.
fn fingerprint(conn: &Connection) -> StoreResult<String> {
    conn.query_row(
        "SELECT 'events ' || (SELECT COUNT(*) || '/' || IFNULL(MAX(id), 0) FROM events)
             || '; deliveries ' || (SELECT COUNT(*) || '/' || IFNULL(MAX(id), 0) || '/'
                 || IFNULL(MAX(updated_at), 0) || '/' || IFNULL(SUM(attempts), 0) FROM deliveries)
             || '; attempts ' || (SELECT COUNT(*) || '/' || IFNULL(MAX(id), 0) FROM attempts)
             || '; chat_contexts ' || (SELECT COUNT(*) || '/' || IFNULL(MAX(found_at), 0)
                 FROM chat_contexts)
             || '; market_campaigns ' || (SELECT COUNT(*) || '/' || IFNULL(MAX(learnt_at), 0)
                 FROM market_campaigns)",
        [],
        |r| r.get(0),
    )
    .map_err(sqlite_error)
}

fn take_copy_lock(target: &PostgresStore, to: &str) -> Result<(), CopyError> {
    let got: bool = target
        .run_sync(|c| async move {
            Ok(
                c.query_one("SELECT pg_try_advisory_lock($1, 0)", &[&COPY_LOCK])
                    .await
                    .map_err(db_error)?
                    .get(0),
            )
        })
        .map_err(failed)?;
    if got {
        Ok(())
    } else {
        Err(CopyError::Refused(format!(
            "another store copy is writing to {to}; wait for it to end (or stop it) first"
        )))
    }
}

enum Prepared {
    Fresh,
    Resumed,
    AlreadyDone,
}

/// Decides whether the target may take this copy, and records it.
fn prepare_target(
    target: &PostgresStore,
    source: &str,
    fingerprint: &str,
    resume: bool,
    to: &str,
) -> Result<Prepared, CopyError> {
    let copies: Vec<(String, String, Option<i64>)> = target
        .run_sync(|c| async move {
            Ok(c.query(
                "SELECT source, fingerprint, finished_at FROM store_copies ORDER BY started_at",
                &[],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
        })
        .map_err(failed)?;
    let fresh_hint = "copy into an empty database (CREATE DATABASE a new one, or drop and \
                      recreate this one)";
    match copies.as_slice() {
        [] => {
            let holding = rows_held(target).map_err(failed)?;
            if !holding.is_empty() {
                return Err(CopyError::Refused(format!(
                    "the target {to} already holds data ({}) that no store copy wrote; copying \
                     into it would mix two stores (ids would collide): {fresh_hint}. --resume \
                     only goes on with an interrupted copy of the same file",
                    holding.join(", ")
                )));
            }
            target
                .run_sync({
                    let (source, fingerprint) = (source.to_owned(), fingerprint.to_owned());
                    move |c| async move {
                        c.execute(
                            "INSERT INTO store_copies (source, fingerprint, started_at)
                             VALUES ($1, $2, $3)",
                            &[&source, &fingerprint, &now_ms()],
                        )
                        .await
                        .map_err(db_error)
                    }
                })
                .map_err(failed)?;
            Ok(Prepared::Fresh)
        }
        [(_, theirs, finished)] if theirs == fingerprint => match (finished, resume) {
            (None, true) => Ok(Prepared::Resumed),
            (None, false) => Err(CopyError::Refused(format!(
                "the target {to} holds an interrupted copy of this file: run the same command \
                 with --resume to go on with it"
            ))),
            (Some(_), true) => Ok(Prepared::AlreadyDone),
            (Some(_), false) => Err(CopyError::Refused(format!(
                "the target {to} already holds a finished copy of this file; nothing to do"
            ))),
        },
        [(theirs_from, _, finished), ..] => {
            let what = if finished.is_some() {
                "a finished"
            } else {
                "an unfinished"
            };
            Err(CopyError::Refused(format!(
                "the target {to} holds {what} copy of {theirs_from}, and {source} is not that \
                 database as it was then (another file, or a serve has changed it since); \
                 resuming would mix two states of the store: {fresh_hint}, then copy again"
            )))
        }
    }
}

/// The target's tables that hold rows, with how many.
fn rows_held(target: &PostgresStore) -> StoreResult<Vec<String>> {
    let mut held = Vec::new();
    for table in Table::ALL
        .iter()
        .map(|t| t.name())
        .chain(["quota_slots", "method_pauses"])
    {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        let n: i64 = target.run_sync(move |c| async move {
            Ok(c.query_one(&sql, &[]).await.map_err(db_error)?.get(0))
        })?;
        if n > 0 {
            held.push(format!("{n} {table}"));
        }
    }
    Ok(held)
}

/// Moves the id sequences past the file's highest ids (and the target's),
/// so no id the copy still needs can be handed out.
fn set_sequences(source: &Connection, target: &PostgresStore) -> StoreResult<()> {
    for table in [Table::Events, Table::Deliveries, Table::Attempts] {
        let name = table.name();
        let max: i64 = source
            .query_row(&format!("SELECT IFNULL(MAX(id), 0) FROM {name}"), [], |r| {
                r.get(0)
            })
            .map_err(sqlite_error)?;
        if max == 0 {
            continue;
        }
        let sql = format!(
            "SELECT setval(pg_get_serial_sequence('{name}', 'id'),
                 GREATEST($1, (SELECT COALESCE(MAX(id), 0) FROM {name}),
                     (SELECT last_value FROM {name}_id_seq)))"
        );
        target.run_sync(move |c| async move {
            c.query_one(&sql, &[&max]).await.map_err(db_error)?;
            Ok(())
        })?;
    }
    Ok(())
}

/// Copies one table in batches; returns the rows this run wrote.
fn copy_table(
    table: Table,
    rows: i64,
    source: &Connection,
    target: &PostgresStore,
    batch: usize,
    summary: &mut CopySummary,
    progress: &mut dyn FnMut(&str),
) -> StoreResult<u64> {
    let name = table.name();
    let mut cursor = table.start(target)?;
    match &cursor {
        Cursor::Id(after) if *after > 0 => {
            progress(&format!("{name}: {rows} rows; going on after id {after}"))
        }
        _ => progress(&format!("{name}: {rows} rows")),
    }
    let (mut read, mut copied) = (0u64, 0u64);
    let mut last_line = Instant::now();
    loop {
        let step = table.copy_batch(source, target, &cursor, batch)?;
        read += step.read as u64;
        copied += step.inserted;
        summary.requeued += step.requeued;
        summary.quota_slots += step.slots;
        let Some(next) = step.next else { break };
        cursor = next;
        if last_line.elapsed() >= PROGRESS_EVERY {
            progress(&format!("{name}: {read} rows read, {copied} written"));
            last_line = Instant::now();
        }
    }
    progress(&format!("{name}: done, {copied} rows written"));
    Ok(copied)
}
