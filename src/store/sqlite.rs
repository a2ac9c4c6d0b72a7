//! SQLite backend. WAL with `synchronous=FULL`: a commit is on disk when it
//! returns. One writer thread owns the write connection and batches every
//! write waiting in its queue, and those that arrive while the batch runs
//! (for up to `EXTEND_FOR`), into one transaction (group commit). One
//! failing write does not undo the others: a batch with a failure is
//! rolled back and runs again with each write in its own savepoint (see
//! `run_batch`). Callers hear back only after the batch's commit. Reads
//! use their own connections on the blocking pool. WAL checkpoints run on
//! a thread of their own (`checkpointer`), not on the writer's commits.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, LazyLock, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::*;
use crate::clock::to_rfc3339;

/// Writes waiting beyond this many go into the next transaction.
const MAX_BATCH: usize = 1024;
/// How long a batch keeps taking the writes that arrived while it ran
/// (see `run_batch`): what a write waits for its commit beyond its own batch.
const EXTEND_FOR: std::time::Duration = std::time::Duration::from_millis(2);
/// The checkpointer copies the WAL into the database at most this often.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// The writer checkpoints by itself only past this many WAL pages (40 MB):
/// a backstop should the checkpointer fall behind.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 10_000;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    payload     TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    UNIQUE (source, external_id)
);
CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events(id),
    route           TEXT NOT NULL,
    template        TEXT NOT NULL,
    business_id     INTEGER,
    chat_id         INTEGER,
    text            TEXT,
    state           TEXT NOT NULL,
    reason          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    queued_at       INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    updated_at      INTEGER NOT NULL,
    delivered_at    INTEGER
);
CREATE INDEX deliveries_due ON deliveries (business_id, next_attempt_at, id) WHERE state = 'queued';
CREATE INDEX deliveries_chat_open ON deliveries (business_id, chat_id, id) WHERE state IN ('queued', 'sending', 'held');
CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE state = 'sending';
CREATE INDEX deliveries_held ON deliveries (business_id, id) WHERE state = 'held';
CREATE INDEX deliveries_event ON deliveries (event_id);
CREATE INDEX deliveries_state ON deliveries (state, id);
CREATE TABLE attempts (
    id           INTEGER PRIMARY KEY,
    delivery_id  INTEGER NOT NULL REFERENCES deliveries(id),
    business_id  INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    latency_ms   INTEGER NOT NULL,
    http_status  INTEGER,
    outcome      TEXT NOT NULL,
    api_errors   TEXT NOT NULL,
    error        TEXT,
    counts_quota INTEGER NOT NULL
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, id);
CREATE INDEX attempts_quota ON attempts (business_id, finished_at) WHERE counts_quota = 1;
"#,
    r#"
CREATE INDEX events_received ON events (received_at);
"#,
    // Chats found by order or return, and conversations (see store/mod.rs).
    r#"
ALTER TABLE deliveries ADD COLUMN context_type TEXT;
ALTER TABLE deliveries ADD COLUMN context_id INTEGER;
ALTER TABLE deliveries ADD COLUMN conversation TEXT;
UPDATE deliveries SET conversation = 'chat:' || chat_id WHERE chat_id IS NOT NULL;
DROP INDEX deliveries_chat_open;
CREATE INDEX deliveries_conversation_open ON deliveries (business_id, conversation, id)
    WHERE state IN ('queued', 'sending', 'held');
CREATE INDEX deliveries_context ON deliveries (context_id, context_type) WHERE context_id IS NOT NULL;
CREATE TABLE chat_contexts (
    business_id  INTEGER NOT NULL,
    context_type TEXT NOT NULL,
    context_id   INTEGER NOT NULL,
    chat_id      INTEGER NOT NULL,
    found_at     INTEGER NOT NULL,
    PRIMARY KEY (business_id, context_type, context_id)
) WITHOUT ROWID;
ALTER TABLE attempts ADD COLUMN method TEXT NOT NULL DEFAULT 'send';
DROP INDEX attempts_quota;
CREATE INDEX attempts_quota ON attempts (business_id, method, finished_at) WHERE counts_quota = 1;
"#,
    // The Market's notifications: the business a campaign belongs to, the
    // business resolved for an event, and when an event happened to its
    // subject (an order or return), to spot statuses that arrive late.
    r#"
CREATE TABLE market_campaigns (
    campaign_id INTEGER PRIMARY KEY,
    business_id INTEGER NOT NULL,
    learnt_at   INTEGER NOT NULL
);
ALTER TABLE events ADD COLUMN business_id INTEGER;
ALTER TABLE events ADD COLUMN subject TEXT;
ALTER TABLE events ADD COLUMN happened_at INTEGER;
CREATE INDEX events_subject ON events (source, subject, happened_at) WHERE subject IS NOT NULL;
"#,
    // Claim tokens: a completion applies only to the claim that made it.
    r#"
ALTER TABLE deliveries ADD COLUMN claim_token INTEGER;
"#,
    // The row `ping` rewrites: readiness is a committed write, since a full
    // disk refuses writes while reads still work.
    r#"
CREATE TABLE store_probe (id INTEGER PRIMARY KEY CHECK (id = 1), probes INTEGER NOT NULL);
"#,
    // The Market's pauses of a business's method (a 420, or Remaining: 0),
    // so a restarted process does not call into a used-up window.
    r#"
CREATE TABLE method_pauses (
    business_id INTEGER NOT NULL,
    method      TEXT NOT NULL,
    until_at    INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    PRIMARY KEY (business_id, method)
) WITHOUT ROWID;
"#,
    // The queue's gauges without counting the queue: deliveries per
    // business (0: none yet) and state, kept by triggers inside the very
    // transaction that changes a delivery, so they cannot drift from the
    // rows (filled from the rows on upgrade). The oldest queued delivery of
    // a business is one probe of `deliveries_queued_since`.
    r#"
CREATE TABLE delivery_counts (
    business_id INTEGER NOT NULL,
    state       TEXT NOT NULL,
    n           INTEGER NOT NULL,
    PRIMARY KEY (business_id, state)
) WITHOUT ROWID;
INSERT INTO delivery_counts (business_id, state, n)
    SELECT IFNULL(business_id, 0), state, COUNT(*) FROM deliveries GROUP BY 1, 2;
CREATE TRIGGER delivery_counts_insert AFTER INSERT ON deliveries BEGIN
    INSERT INTO delivery_counts (business_id, state, n) VALUES (IFNULL(NEW.business_id, 0), NEW.state, 1)
        ON CONFLICT (business_id, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER delivery_counts_update AFTER UPDATE OF state, business_id ON deliveries
    WHEN OLD.state IS NOT NEW.state OR OLD.business_id IS NOT NEW.business_id
BEGIN
    UPDATE delivery_counts SET n = n - 1
        WHERE business_id = IFNULL(OLD.business_id, 0) AND state = OLD.state;
    INSERT INTO delivery_counts (business_id, state, n) VALUES (IFNULL(NEW.business_id, 0), NEW.state, 1)
        ON CONFLICT (business_id, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER delivery_counts_delete AFTER DELETE ON deliveries BEGIN
    UPDATE delivery_counts SET n = n - 1
        WHERE business_id = IFNULL(OLD.business_id, 0) AND state = OLD.state;
END;
CREATE INDEX deliveries_queued_since ON deliveries (business_id, queued_at) WHERE state = 'queued';
"#,
    // The claim of deliveries whose chat must be found first: without an
    // index of its own it walked every due delivery of the business (all
    // with chats) on the writer thread, each round: 2.5 s a round with
    // 1,000,000 queued, while webhooks waited. Few rows are in it.
    r#"
CREATE INDEX deliveries_due_lookup ON deliveries (business_id, next_attempt_at, id)
    WHERE state = 'queued' AND chat_id IS NULL;
"#,
    // The writer keeps delivery_counts itself, once per transaction (see
    // COUNT_CHANGES): the triggers ran for every row inserted or changed.
    // The counts are taken again from the rows, as in migration 8.
    r#"
DROP TRIGGER delivery_counts_insert;
DROP TRIGGER delivery_counts_update;
DROP TRIGGER delivery_counts_delete;
DELETE FROM delivery_counts;
INSERT INTO delivery_counts (business_id, state, n)
    SELECT IFNULL(business_id, 0), state, COUNT(*) FROM deliveries GROUP BY 1, 2;
"#,
    // When a delivery closed (delivered, dead, failed or cancelled; NULL
    // while queued, sending or held), so that the index of open deliveries
    // per conversation names a column that only closing and reopening
    // change. It named `state`, so SQLite deleted and inserted the very
    // same entry at every lease and every retry: a quarter of a lease's
    // work, on a page of its own per chat.
    r#"
ALTER TABLE deliveries ADD COLUMN closed_at INTEGER;
UPDATE deliveries SET closed_at = updated_at WHERE state NOT IN ('queued', 'sending', 'held');
DROP INDEX deliveries_conversation_open;
CREATE INDEX deliveries_conversation_open ON deliveries (business_id, conversation, id)
    WHERE closed_at IS NULL;
"#,
    // The listing by state leaves out `sending`: a delivery is there only
    // for the length of one call, and the index's entry was deleted and
    // inserted again at every lease and every answer (two of the five
    // changes of this index per message). The few sending ones are listed
    // through `deliveries_leased`.
    r#"
DROP INDEX deliveries_state;
CREATE INDEX deliveries_state ON deliveries (state, id) WHERE state <> 'sending';
"#,
    // The attempts that count for the quota, by time first: keyed by
    // business, each answer went to the end of its business's range, so a
    // batch of 30 answers wrote some 25 pages of this index to the WAL
    // (29 of the 42 frames of a batch of answers; a third of all frames
    // per message). By time, a batch appends to one page. The window of
    // one business is read only when the dispatcher first meets it and
    // by `/admin/queue` for one it has not met; the index covers that
    // query (`counts_quota` is a column so SQLite needs no row), which
    // walks the window's entries of all businesses: 5 ms for 106,000.
    r#"
DROP INDEX attempts_quota;
CREATE INDEX attempts_quota ON attempts (finished_at, business_id, method, counts_quota)
    WHERE counts_quota = 1;
"#,
];

/// The condition, on a delivery `d`, that an earlier delivery of its
/// conversation is still open (queued, sending or held): `d` waits for it.
/// Per-conversation order rests on this one test (claims, `next_due`, the
/// queue's reasons for waiting).
macro_rules! behind_in_conversation {
    () => {
        "EXISTS (SELECT 1 FROM deliveries p INDEXED BY deliveries_conversation_open
             WHERE p.business_id = d.business_id AND p.conversation = d.conversation
               AND p.id < d.id AND p.closed_at IS NULL)"
    };
}

/// A write: `FnMut` because a batch that had a failing job runs again
/// (see `run_batch`), so a job must not consume what it captured.
type WriteFn<T> = Box<dyn FnMut(&Connection) -> StoreResult<T> + Send>;

/// A write waiting for the writer thread: runs inside the batch, answers after commit.
trait WriteJob: Send {
    /// Runs the job (`isolated`: in its own savepoint); returns its
    /// error, if it failed.
    fn run(&mut self, conn: &Connection, isolated: bool) -> Option<StoreError>;
    fn finish(self: Box<Self>, committed: Result<(), StoreError>);
}

struct Job<T> {
    work: WriteFn<T>,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T: Send + 'static> WriteJob for Job<T> {
    fn run(&mut self, conn: &Connection, isolated: bool) -> Option<StoreError> {
        let work = &mut self.work;
        if !isolated {
            let result = work(conn);
            let failed = result.as_ref().err().cloned();
            self.result = Some(result);
            return failed;
        }
        let mark = counts_noted();
        let outcome = run_cached(conn, "SAVEPOINT job").and_then(|_| work(conn));
        let cleaned = match outcome.is_ok() {
            true => run_cached(conn, "RELEASE job"),
            false => {
                forget_counts_after(mark);
                conn.execute_batch("ROLLBACK TO job; RELEASE job")
                    .map_err(db_error)
            }
        };
        let result = cleaned.and(outcome);
        let failed = result.as_ref().err().cloned();
        self.result = Some(result);
        failed
    }

    fn finish(self: Box<Self>, committed: Result<(), StoreError>) {
        let answer = match committed {
            Ok(()) => self.result.unwrap_or(Err(StoreError::Closed)),
            Err(e) => Err(e),
        };
        let _ = self.reply.send(answer);
    }
}

fn run_cached(conn: &Connection, sql: &str) -> StoreResult<()> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(db_error)
}

pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<mpsc::Sender<Box<dyn WriteJob>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

/// SQLite's errors that mean "cannot write now, try later" (a full disk,
/// an I/O error, a file that cannot be opened or is read-only, a lock held
/// past `busy_timeout`) are `Unavailable`; the rest are mistakes.
fn db_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(
            DiskFull | SystemIoFailure | CannotOpen | ReadOnly | DatabaseBusy | DatabaseLocked
            | OutOfMemory,
        ) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Database(e.to_string()),
    }
}

fn open_connection(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(|e| match db_error(e) {
        StoreError::Unavailable(e) => {
            StoreError::Unavailable(format!("cannot open {}: {e}", path.display()))
        }
        other => StoreError::Database(format!("cannot open {}: {other}", path.display())),
    })?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA busy_timeout = 5000;
         PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY;",
    )
    .map_err(db_error)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(db_error)? as usize;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Database(format!(
            "the database schema is version {version}, newer than this chatbridge knows ({}); upgrade chatbridge",
            MIGRATIONS.len()
        )));
    }
    for (i, script) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction().map_err(db_error)?;
        tx.execute_batch(script).map_err(db_error)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
    }
    Ok(())
}

thread_local! {
    /// `delivery_counts` rows (per business, 0 for none, and state) changed by
    /// the writes of the open transaction, written with it just before its
    /// commit (`write_counts`), so the counts still change with the rows, in
    /// the same transaction. Every write that changes a delivery's state notes
    /// it here (`count`, `count_move`). They were triggers on `deliveries`
    /// until SQLite migration 10: a trigger's sub-program ran for every row
    /// inserted or changed, three per message, about a tenth of the writer's
    /// work; a batch now writes each (business, state) it changed once. Only
    /// the writer thread writes, so the log is the writer thread's own.
    static COUNT_CHANGES: std::cell::RefCell<Vec<(i64, DeliveryState, i64)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn count(business: Option<i64>, state: DeliveryState, by: i64) {
    COUNT_CHANGES.with(|c| c.borrow_mut().push((business.unwrap_or(0), state, by)));
}

fn count_move(business: Option<i64>, from: DeliveryState, to: DeliveryState) {
    if from != to {
        count(business, from, -1);
        count(business, to, 1);
    }
}

/// How many changes are noted; `forget_counts_after` drops the later ones
/// (a job rolled back to its savepoint).
fn counts_noted() -> usize {
    COUNT_CHANGES.with(|c| c.borrow().len())
}

fn forget_counts_after(mark: usize) {
    COUNT_CHANGES.with(|c| c.borrow_mut().truncate(mark));
}

/// Adds the noted changes to `delivery_counts`, one row per (business,
/// state), and forgets them.
fn write_counts(conn: &Connection) -> StoreResult<()> {
    let mut sums = std::collections::HashMap::<(i64, DeliveryState), i64>::new();
    for (business, state, by) in COUNT_CHANGES.with(|c| std::mem::take(&mut *c.borrow_mut())) {
        *sums.entry((business, state)).or_default() += by;
    }
    let mut upsert = conn
        .prepare_cached(
            "INSERT INTO delivery_counts (business_id, state, n) VALUES (?1, ?2, ?3)
             ON CONFLICT (business_id, state) DO UPDATE SET n = n + excluded.n",
        )
        .map_err(db_error)?;
    for ((business, state), by) in sums.into_iter().filter(|(_, by)| *by != 0) {
        upsert
            .execute(params![business, state.as_str(), by])
            .map_err(db_error)?;
    }
    Ok(())
}

/// A delivery's business and state before a write changes it.
fn before_change(conn: &Connection, id: i64) -> StoreResult<Option<(Option<i64>, DeliveryState)>> {
    conn.prepare_cached("SELECT business_id, state FROM deliveries WHERE id = ?1")
        .and_then(|mut s| {
            s.query_row([id], |r| Ok((r.get(0)?, state_of(r.get(1)?))))
                .optional()
        })
        .map_err(db_error)
}

/// Runs the batch's jobs in the open transaction: all of them when
/// `isolated` (each in its savepoint), else up to the first that fails.
/// `Ok(true)`: none failed; `Err`: SQLite rolled the transaction back.
fn run_jobs(
    conn: &Connection,
    batch: &mut [Box<dyn WriteJob>],
    isolated: bool,
) -> Result<bool, StoreError> {
    let mut cause: Option<StoreError> = None;
    let rolled_back = |cause: Option<StoreError>| {
        cause
            .unwrap_or_else(|| StoreError::Unavailable("SQLite rolled the transaction back".into()))
    };
    let mut all_ok = true;
    for job in batch.iter_mut() {
        if conn.is_autocommit() {
            return Err(rolled_back(cause));
        }
        if let Some(e) = job.run(conn, isolated) {
            all_ok = false;
            if e.is_unavailable() {
                cause.get_or_insert(e);
            }
            if !isolated {
                break;
            }
        }
    }
    if conn.is_autocommit() {
        return Err(rolled_back(cause));
    }
    Ok(all_ok)
}

fn writer_loop(
    conn: Connection,
    jobs: mpsc::Receiver<Box<dyn WriteJob>>,
    committed_some: mpsc::SyncSender<()>,
) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        take_waiting(&jobs, &mut batch);
        let committed = run_batch(&conn, &mut batch, &jobs);
        for job in batch {
            job.finish(committed.clone());
        }
        // Full: a nudge is already waiting.
        let _ = committed_some.try_send(());
    }
}

/// Copies committed WAL pages into the database file, on its own thread
/// and connection, so the writer's commits never wait for a checkpoint
/// (its copy and the database file's fsync). SQLite would otherwise run
/// one inside a commit every 1,000 pages, while every webhook of the next
/// batch waits. PASSIVE never blocks the writer or readers; the WAL starts
/// over from its beginning once a checkpoint has copied all of it. Ends
/// when the writer does.
fn checkpointer(conn: Connection, commits: mpsc::Receiver<()>) {
    while commits.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_EVERY);
        while commits.try_recv().is_ok() {}
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            // The next commit tries again; the writer's own backstop
            // (WRITER_AUTOCHECKPOINT_PAGES) bounds the WAL meanwhile.
            tracing::debug!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// Takes the writes already waiting, up to [`MAX_BATCH`] in the batch;
/// returns how many it took.
fn take_waiting(
    jobs: &mpsc::Receiver<Box<dyn WriteJob>>,
    batch: &mut Vec<Box<dyn WriteJob>>,
) -> usize {
    let before = batch.len();
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    batch.len() - before
}

/// Runs the batch in one transaction and commits it.
///
/// Writes that arrive while the batch runs join it, as long as it has run
/// for less than [`EXTEND_FOR`]: it never waits for them, it takes only
/// what is already there. Most of a commit's cost is per page it changed
/// (each goes to the WAL once, with its checksum and its write), and the
/// writes of one moment share pages (the tables' last pages, each
/// business's place in the queue's indexes), so fewer, larger commits cost
/// less per write; every caller still hears back only after the commit.
///
/// The jobs first run straight in the transaction. A job that fails may
/// have written part of its work, which must not commit with the others:
/// then the transaction is rolled back and the batch runs again with each
/// job in its own savepoint, so only the failed one is undone. Running
/// every job in a savepoint always would be simpler, but a savepoint
/// copies each page its job touches into a sub-journal (for a webhook,
/// a dozen table and index pages): the profile put that, with the
/// statements around it, at about a third of the writer thread.
///
/// On a full disk or an I/O error SQLite may roll the whole transaction
/// back by itself: then the jobs after it must not run (each would commit
/// on its own, outside the batch), and every job of the batch hears why it
/// was not stored.
fn run_batch(
    conn: &Connection,
    batch: &mut Vec<Box<dyn WriteJob>>,
    waiting: &mpsc::Receiver<Box<dyn WriteJob>>,
) -> Result<(), StoreError> {
    forget_counts_after(0);
    conn.execute_batch("BEGIN IMMEDIATE").map_err(db_error)?;
    let began = std::time::Instant::now();
    let mut ran = 0;
    let all_ok = loop {
        let all_ok = run_jobs(conn, &mut batch[ran..], false)?;
        ran = batch.len();
        if !all_ok || began.elapsed() >= EXTEND_FOR || take_waiting(waiting, batch) == 0 {
            break all_ok;
        }
    };
    if !all_ok {
        forget_counts_after(0);
        conn.execute_batch("ROLLBACK").map_err(db_error)?;
        conn.execute_batch("BEGIN IMMEDIATE").map_err(db_error)?;
        run_jobs(conn, batch, true)?;
    }
    write_counts(conn)
        .and_then(|()| conn.execute_batch("COMMIT").map_err(db_error))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })
}

impl SqliteStore {
    pub fn open(path: &Path) -> StoreResult<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Database(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let mut conn = open_connection(path)?;
        migrate(&mut conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            .map_err(db_error)?;
        let checkpoints = open_connection(path)?;
        let (nudge, nudged) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpointer(checkpoints, nudged))
            .map_err(|e| {
                StoreError::Database(format!("cannot start the checkpoint thread: {e}"))
            })?;
        let (tx, rx) = mpsc::channel::<Box<dyn WriteJob>>();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, nudge))
            .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: Mutex::new(tx),
            readers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        work: impl FnMut(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn WriteJob> = Box::new(Job {
            work: Box::new(work),
            result: None,
            reply,
        });
        self.writer
            .lock()
            .map_err(|_| StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().ok().and_then(|mut pool| pool.pop());
            let conn = match pooled {
                Some(c) => c,
                None => open_connection(&path)?,
            };
            let result = work(&conn);
            if let Ok(mut pool) = readers.lock() {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Database(format!("read task failed: {e}")))?
    }
}

fn state_of(raw: String) -> DeliveryState {
    // Only this module writes states, so an unknown one means a newer schema.
    DeliveryState::parse(&raw).unwrap_or(DeliveryState::Failed)
}

fn event_by_key(
    conn: &Connection,
    source: &str,
    external_id: &str,
) -> StoreResult<Option<StoredEvent>> {
    let id: Option<i64> = conn
        .query_row(
            "SELECT id FROM events WHERE source = ?1 AND external_id = ?2",
            params![source, external_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_error)?;
    match id {
        Some(id) => event_by_id(conn, id),
        None => Ok(None),
    }
}

fn event_by_id(conn: &Connection, id: i64) -> StoreResult<Option<StoredEvent>> {
    let event = conn
        .query_row(
            "SELECT id, source, external_id, event_type, payload, received_at, business_id FROM events WHERE id = ?1",
            [id],
            |r| {
                Ok(StoredEvent {
                    id: r.get(0)?,
                    source: r.get(1)?,
                    external_id: r.get(2)?,
                    event_type: r.get(3)?,
                    payload: r.get(4)?,
                    received_at: r.get(5)?,
                    deliveries: Vec::new(),
                    business_id: r.get::<_, Option<i64>>(6)?.map(BusinessId),
                })
            },
        )
        .optional()
        .map_err(db_error)?;
    let Some(mut event) = event else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare_cached("SELECT id, route, state FROM deliveries WHERE event_id = ?1 ORDER BY id")
        .map_err(db_error)?;
    event.deliveries = stmt
        .query_map([id], |r| {
            Ok(DeliverySummary {
                id: r.get(0)?,
                route: r.get(1)?,
                state: state_of(r.get(2)?),
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(db_error)?;
    Ok(Some(event))
}

const DELIVERY_COLUMNS: &str = "d.id, d.event_id, e.source, e.event_type, d.route, d.template, d.business_id, \
     d.chat_id, d.state, d.reason, d.attempts, d.created_at, d.next_attempt_at, d.delivered_at, d.text, \
     d.context_type, d.context_id";

fn delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: r.get(0)?,
        event_id: r.get(1)?,
        source: r.get(2)?,
        event_type: r.get(3)?,
        route: r.get(4)?,
        template: r.get(5)?,
        business_id: r.get(6)?,
        chat_id: r.get(7)?,
        state: state_of(r.get(8)?),
        reason: r.get(9)?,
        attempts: r.get(10)?,
        created_at: to_rfc3339(r.get(11)?),
        next_attempt_at: to_rfc3339(r.get(12)?),
        delivered_at: r.get::<_, Option<i64>>(13)?.map(to_rfc3339),
        text: r.get(14)?,
        order_id: context_of(r.get(15)?, r.get(16)?)
            .filter(|c| c.kind == crate::domain::ContextKind::Order)
            .map(|c| c.id),
        return_id: context_of(r.get(15)?, r.get(16)?)
            .filter(|c| c.kind == crate::domain::ContextKind::Return)
            .map(|c| c.id),
    })
}

/// Remembers the chat of an order or return, and moves every open delivery
/// of that order or return into the chat's conversation, in their order.
fn remember_chat(
    conn: &Connection,
    business: BusinessId,
    context: ChatContext,
    chat: ChatId,
    now: Millis,
) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO chat_contexts (business_id, context_type, context_id, chat_id, found_at)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
    )
    .and_then(|mut s| {
        s.execute(params![
            business.0,
            context.kind.as_str(),
            context.id,
            chat.0,
            now
        ])
    })
    .map_err(db_error)?;
    let from = crate::domain::conversation_key(None, Some(context));
    let to = crate::domain::conversation_key(Some(chat), None);
    conn.prepare_cached(
        "UPDATE deliveries SET chat_id = ?4, conversation = ?5, updated_at = ?6
         WHERE business_id = ?1 AND conversation = ?2 AND chat_id IS NULL
           AND state IN ('queued', 'sending', 'held') AND context_type = ?3",
    )
    .and_then(|mut s| {
        s.execute(params![
            business.0,
            from,
            context.kind.as_str(),
            chat.0,
            to,
            now
        ])
    })
    .map_err(db_error)?;
    Ok(())
}

/// Why an event about `ordering.subject` must send nothing: a stored
/// event of the same source and subject happened later. `None`: it is the
/// latest news (ties are not stale: they carry other statuses, or they
/// would have been repeats).
fn later_news(
    conn: &Connection,
    source: &str,
    ordering: &EventOrdering,
    this_event: i64,
) -> StoreResult<Option<String>> {
    let later: Option<(i64, String, i64)> = conn
        .prepare_cached(
            "SELECT id, event_type, happened_at FROM events INDEXED BY events_subject
             WHERE source = ?1 AND subject = ?2 AND happened_at > ?3 AND id <> ?4
             ORDER BY happened_at DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row(
                params![source, ordering.subject, ordering.happened_at, this_event],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
        .map_err(db_error)?;
    Ok(later.map(|(id, event_type, at)| stale_reason(ordering, id, &event_type, at)))
}

/// A delivery's chat, context and conversation columns. The chat of an
/// order or return is looked up inside the writing transaction: the single
/// writer orders this against the write that records a found chat, so a
/// delivery either sees the chat or is moved to it by that write.
#[derive(Default)]
struct Addressed {
    chat: Option<i64>,
    context_type: Option<&'static str>,
    context_id: Option<i64>,
    conversation: Option<String>,
}

impl Addressed {
    fn find(conn: &Connection, business: BusinessId, target: Target) -> StoreResult<Self> {
        let (chat, context) = match target {
            Target::Chat(chat) => (Some(chat), None),
            Target::Context(ctx) => (known_chat(conn, business, ctx)?, Some(ctx)),
        };
        Ok(Self {
            chat: chat.map(|c| c.0),
            context_type: context.map(|c| c.kind.as_str()),
            context_id: context.map(|c| c.id),
            conversation: crate::domain::conversation_key(chat, context),
        })
    }
}

fn known_chat(
    conn: &Connection,
    business: BusinessId,
    context: ChatContext,
) -> StoreResult<Option<ChatId>> {
    conn.prepare_cached(
        "SELECT chat_id FROM chat_contexts
         WHERE business_id = ?1 AND context_type = ?2 AND context_id = ?3",
    )
    .and_then(|mut s| {
        s.query_row(
            params![business.0, context.kind.as_str(), context.id],
            |r| Ok(ChatId(r.get(0)?)),
        )
        .optional()
    })
    .map_err(db_error)
}

fn context_of(kind: Option<String>, id: Option<i64>) -> Option<ChatContext> {
    Some(ChatContext {
        kind: crate::domain::ContextKind::parse(&kind?)?,
        id: id?,
    })
}

/// Leases due heads of their conversations: `lookups = true` those whose
/// chat must be found first, else those with a known chat.
fn claim_heads(
    conn: &Connection,
    business: BusinessId,
    now: Millis,
    lease_until: Millis,
    limit: usize,
    lookups: bool,
) -> StoreResult<Vec<Claimed>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let sql = match lookups {
        true => &CLAIM_HEADS_SQL.0,
        false => &CLAIM_HEADS_SQL.1,
    };
    let rows: Vec<Claimed> = conn
        .prepare_cached(sql)
        .and_then(|mut s| {
            s.query_map(params![business.0, now, limit as i64], claimed_row)?
                .collect()
        })
        .map_err(db_error)?;
    lease(conn, rows, DeliveryState::Queued, lease_until, now)
}

/// `claim_heads` of deliveries whose chat is still to be found, and of
/// those with a chat: written once, not at every claim of every business.
/// The earliest open delivery of each conversation goes first: a later
/// one waits while an earlier one is queued, sending or held.
static CLAIM_HEADS_SQL: LazyLock<(String, String)> = LazyLock::new(|| {
    let sql = |index: &str, chat: &str| {
        format!(
            "SELECT {CLAIMED_COLUMNS} FROM deliveries d INDEXED BY {index}
             WHERE d.state = 'queued' AND d.business_id = ?1 AND d.next_attempt_at <= ?2
               AND d.chat_id IS {chat} NULL
               AND NOT {}
             ORDER BY d.next_attempt_at, d.id LIMIT ?3",
            behind_in_conversation!()
        )
    };
    (
        sql("deliveries_due_lookup", ""),
        sql("deliveries_due", "NOT"),
    )
});

/// What a claim reads of a delivery (`d`), in the order `claimed_row` takes.
const CLAIMED_COLUMNS: &str = "d.id, d.route, d.business_id, d.chat_id, d.text, d.attempts, \
     d.queued_at, d.context_type, d.context_id";

fn claimed_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Claimed> {
    Ok(Claimed {
        id: r.get(0)?,
        route: r.get(1)?,
        business_id: BusinessId(r.get(2)?),
        chat_id: r.get::<_, Option<i64>>(3)?.map(ChatId),
        text: r.get(4)?,
        attempts: r.get(5)?,
        queued_at: r.get(6)?,
        context: context_of(r.get(7)?, r.get(8)?),
        claim_token: 0,
    })
}

/// Leases the deliveries just read (in the same transaction, so they are
/// still queued or held), each under a fresh claim token. A plain UPDATE:
/// `UPDATE … RETURNING` builds a temporary table per row, which the
/// profile put at a tenth of the lease.
fn lease(
    conn: &Connection,
    mut rows: Vec<Claimed>,
    from: DeliveryState,
    lease_until: Millis,
    now: Millis,
) -> StoreResult<Vec<Claimed>> {
    let mut update = conn
        .prepare_cached(
            "UPDATE deliveries SET state = 'sending', lease_until = ?2, updated_at = ?3, claim_token = ?4
             WHERE id = ?1",
        )
        .map_err(db_error)?;
    for row in &mut rows {
        row.claim_token = rand::random::<i64>();
        update
            .execute(params![row.id, lease_until, now, row.claim_token])
            .map_err(db_error)?;
        count_move(Some(row.business_id.0), from, DeliveryState::Sending);
    }
    Ok(rows)
}

/// `Store::claim` on the writer's connection.
fn claim_in(
    conn: &Connection,
    business: BusinessId,
    now: Millis,
    lease_until: Millis,
    limits: ClaimLimits,
    held: bool,
) -> StoreResult<Vec<Claimed>> {
    if held {
        let rows: Vec<Claimed> = conn
            .prepare_cached(&format!(
                "SELECT {CLAIMED_COLUMNS} FROM deliveries d WHERE d.state = 'held' AND d.business_id = ?1
                 ORDER BY d.id LIMIT ?2"
            ))
            .and_then(|mut s| {
                s.query_map(params![business.0, limits.total as i64], claimed_row)?
                    .collect()
            })
            .map_err(db_error)?;
        return lease(conn, rows, DeliveryState::Held, lease_until, now);
    }
    let mut claimed = claim_heads(
        conn,
        business,
        now,
        lease_until,
        limits.chat_lookups.min(limits.total),
        true,
    )?;
    let room = limits.total - claimed.len();
    claimed.extend(claim_heads(
        conn,
        business,
        now,
        lease_until,
        limits.sends.min(room),
        false,
    )?);
    Ok(claimed)
}

/// `Store::next_due`. Only deliveries waiting for a later time are
/// scanned: the few being retried or throttled, not the backlog.
fn next_due_in(
    conn: &Connection,
    business: BusinessId,
    now: Millis,
) -> StoreResult<Option<Millis>> {
    conn.prepare_cached(concat!(
        "SELECT MIN(d.next_attempt_at) FROM deliveries d INDEXED BY deliveries_due
         WHERE d.state = 'queued' AND d.business_id = ?1 AND d.next_attempt_at > ?2
           AND NOT ",
        behind_in_conversation!()
    ))
    .and_then(|mut s| s.query_row(params![business.0, now], |r| r.get(0)))
    .map_err(db_error)
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_event(&self, event: NewEvent) -> StoreResult<Inserted> {
        self.write(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO events (source, external_id, event_type, payload, received_at,
                         business_id, subject, happened_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (source, external_id) DO NOTHING",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        event.source,
                        event.external_id,
                        event.event_type,
                        event.payload,
                        event.received_at,
                        event.business_id.map(|b| b.0),
                        event.ordering.as_ref().map(|o| o.subject.as_str()),
                        event.ordering.as_ref().map(|o| o.happened_at),
                    ])
                })
                .map_err(db_error)?;
            if inserted == 0 {
                return event_by_key(conn, &event.source, &event.external_id)?
                    .map(Inserted::Duplicate)
                    .ok_or_else(|| StoreError::Database("duplicate event vanished".into()));
            }
            let event_id = conn.last_insert_rowid();
            let superseded = match &event.ordering {
                Some(o) => later_news(conn, &event.source, o, event_id)?,
                None => None,
            };
            let mut stmt = conn
                .prepare_cached(
                    "INSERT INTO deliveries (event_id, route, template, business_id, chat_id, text, state,
                         reason, created_at, queued_at, next_attempt_at, updated_at,
                         context_type, context_id, conversation, closed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?9, ?9, ?10, ?11, ?12, ?13)",
                )
                .map_err(db_error)?;
            let mut deliveries = Vec::with_capacity(event.deliveries.len());
            for d in &event.deliveries {
                let (business, text, state, reason) = match (&d.rendered, &superseded) {
                    (Ok(m), Some(why)) => (Some(m.business_id.0), Some(m.text.as_str()), DeliveryState::Cancelled, Some(why.as_str())),
                    (Ok(m), None) => (Some(m.business_id.0), Some(m.text.as_str()), DeliveryState::Queued, None),
                    (Err(f), _) => (f.business_id.map(|b| b.0), None, DeliveryState::Failed, Some(f.reason.as_str())),
                };
                let at = match &d.rendered {
                    Ok(m) => Addressed::find(conn, m.business_id, m.target)?,
                    // What did render is kept, so filters find the failed delivery.
                    Err(f) => match (f.business_id, f.target) {
                        (Some(business), Some(target)) => Addressed::find(conn, business, target)?,
                        _ => Addressed::default(),
                    },
                };
                stmt.execute(params![
                    event_id,
                    d.route,
                    d.template,
                    business,
                    at.chat,
                    text,
                    state.as_str(),
                    reason,
                    event.received_at,
                    at.context_type,
                    at.context_id,
                    at.conversation,
                    (!state.is_open()).then_some(event.received_at)
                ])
                .map_err(db_error)?;
                count(business, state, 1);
                deliveries.push(DeliverySummary {
                    id: conn.last_insert_rowid(),
                    route: d.route.clone(),
                    state,
                });
            }
            Ok(Inserted::New(event.stored(event_id, deliveries)))
        })
        .await
    }

    async fn queued_businesses(&self) -> StoreResult<Vec<(BusinessId, Millis)>> {
        // A skip-scan over the due index: one probe per business, however
        // long the queue. INDEXED BY because, without statistics, SQLite
        // prefers deliveries_state and scans every queued row (10 s at 1M).
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "WITH RECURSIVE b(id) AS (
                        SELECT (SELECT MIN(business_id) FROM deliveries INDEXED BY deliveries_due
                                WHERE state = 'queued')
                        UNION ALL
                        SELECT (SELECT MIN(business_id) FROM deliveries INDEXED BY deliveries_due
                                WHERE state = 'queued' AND business_id > b.id)
                        FROM b WHERE b.id IS NOT NULL
                     )
                     SELECT id, (SELECT MIN(next_attempt_at) FROM deliveries INDEXED BY deliveries_due
                                 WHERE state = 'queued' AND business_id = b.id)
                     FROM b WHERE id IS NOT NULL",
                )
                .map_err(db_error)?;
            stmt.query_map([], |r| Ok((BusinessId(r.get(0)?), r.get(1)?)))
                .and_then(|rows| rows.collect())
                .map_err(db_error)
        })
        .await
    }

    async fn claim(
        &self,
        business: BusinessId,
        now: Millis,
        lease_until: Millis,
        limits: ClaimLimits,
        held: bool,
    ) -> StoreResult<Vec<Claimed>> {
        self.write(move |conn| claim_in(conn, business, now, lease_until, limits, held))
            .await
    }

    async fn claim_round(
        &self,
        wanted: Vec<(BusinessId, ClaimLimits)>,
        now: Millis,
        lease_until: Millis,
    ) -> StoreResult<Vec<RoundClaim>> {
        // One write for the whole round: the look-ups run on the writer's
        // connection inside it, instead of a pooled read per business.
        self.write(move |conn| {
            wanted
                .iter()
                .copied()
                .map(|(business, limits)| {
                    let claimed = claim_in(conn, business, now, lease_until, limits, false)?;
                    let next_due = match claimed.len() < limits.total {
                        true => next_due_in(conn, business, now)?,
                        false => None,
                    };
                    Ok(RoundClaim { claimed, next_due })
                })
                .collect()
        })
        .await
    }

    async fn next_due(&self, business: BusinessId, now: Millis) -> StoreResult<Option<Millis>> {
        self.read(move |conn| next_due_in(conn, business, now))
            .await
    }

    async fn method_pauses(
        &self,
        business: BusinessId,
        now: Millis,
    ) -> StoreResult<Vec<MethodPause>> {
        self.read(move |conn| {
            let rows: Vec<(String, Millis, String)> = conn
                .prepare_cached(
                    "SELECT method, until_at, reason FROM method_pauses
                     WHERE business_id = ?1 AND until_at > ?2",
                )
                .and_then(|mut s| {
                    s.query_map(params![business.0, now], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect()
                })
                .map_err(db_error)?;
            Ok(rows
                .into_iter()
                .filter_map(|(method, until, reason)| {
                    Some(MethodPause {
                        method: MarketMethod::parse(&method)?,
                        until,
                        reason: PauseReason::parse(&reason).unwrap_or(PauseReason::Market420),
                    })
                })
                .collect())
        })
        .await
    }

    async fn record(&self, attempt: Attempt, now: Millis) -> StoreResult<()> {
        self.write(move |conn| {
            let errors = serde_json::to_string(&attempt.api_errors).unwrap_or_else(|_| "[]".into());
            conn.prepare_cached(
                "INSERT INTO attempts (delivery_id, business_id, started_at, finished_at, latency_ms,
                     http_status, outcome, api_errors, error, counts_quota, method)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    attempt.delivery_id,
                    attempt.business_id.0,
                    attempt.started_at,
                    attempt.finished_at,
                    attempt.latency_ms,
                    attempt.http_status,
                    attempt.verdict.outcome_name(),
                    errors,
                    attempt.error,
                    attempt.counts_for_quota,
                    attempt.method.as_str()
                ])
            })
            .map_err(db_error)?;
            if let Verdict::ChatFound { context, chat } = attempt.verdict {
                remember_chat(conn, attempt.business_id, context, chat, now)?;
            }
            for (until, reason) in pauses_of(&attempt) {
                // The later pause wins, with its reason.
                conn.prepare_cached(
                    "INSERT INTO method_pauses (business_id, method, until_at, reason)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (business_id, method) DO UPDATE SET
                         reason = CASE WHEN excluded.until_at > until_at
                             THEN excluded.reason ELSE reason END,
                         until_at = MAX(until_at, excluded.until_at)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        attempt.business_id.0,
                        attempt.method.as_str(),
                        until,
                        reason.as_str()
                    ])
                })
                .map_err(db_error)?;
            }
            let (state, reason, next, delivered_at, counted) = attempt.outcome(now);
            let before = before_change(conn, attempt.delivery_id)?;
            // Only an answer that closes the delivery sets `closed_at`: a
            // retry then leaves the conversation index alone.
            macro_rules! record_update {
                ($closing:literal) => {
                    concat!(
                        "UPDATE deliveries SET state = ?2,
                             reason = CASE WHEN ?2 = 'delivered' THEN NULL ELSE COALESCE(?3, reason) END,
                             next_attempt_at = ?4,
                             delivered_at = ?5, attempts = attempts + ?6, lease_until = NULL, updated_at = ?7",
                        $closing,
                        " WHERE id = ?1 AND claim_token = ?8"
                    )
                };
            }
            let changed = conn.prepare_cached(match state.is_open() {
                true => record_update!(""),
                false => record_update!(", closed_at = ?7"),
            })
            .and_then(|mut s| {
                s.execute(params![
                    attempt.delivery_id,
                    state.as_str(),
                    reason,
                    next,
                    delivered_at,
                    counted,
                    now,
                    attempt.claim_token
                ])
            })
            .map_err(db_error)?;
            if let (1, Some((business, from))) = (changed, before) {
                count_move(business, from, state);
            }
            Ok(())
        })
        .await
    }

    async fn release(&self, ids: Vec<(i64, i64)>, now: Millis) -> StoreResult<()> {
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE deliveries SET state = 'queued', lease_until = NULL, updated_at = ?2
                     WHERE id = ?1 AND state = 'sending' AND claim_token = ?3
                     RETURNING business_id",
                )
                .map_err(db_error)?;
            for &(id, token) in &ids {
                let released = stmt
                    .query_row(params![id, now, token], |r| r.get::<_, Option<i64>>(0))
                    .optional()
                    .map_err(db_error)?;
                if let Some(business) = released {
                    count_move(business, DeliveryState::Sending, DeliveryState::Queued);
                }
            }
            Ok(())
        })
        .await
    }

    async fn calls_since(
        &self,
        business: BusinessId,
        method: MarketMethod,
        since: Millis,
    ) -> StoreResult<Vec<Millis>> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT finished_at FROM attempts INDEXED BY attempts_quota
                 WHERE finished_at > ?3 AND counts_quota = 1 AND business_id = ?1 AND method = ?2
                 ORDER BY finished_at",
            )
            .and_then(|mut s| {
                s.query_map(params![business.0, method.as_str(), since], |r| r.get(0))?
                    .collect()
            })
            .map_err(db_error)
        })
        .await
    }

    async fn known_chat(
        &self,
        business: BusinessId,
        context: ChatContext,
    ) -> StoreResult<Option<ChatId>> {
        self.read(move |conn| known_chat(conn, business, context))
            .await
    }

    async fn reclaim_expired(&self, now: Millis, ours: Vec<i64>) -> StoreResult<u64> {
        self.write(move |conn| {
            let ours = serde_json::to_string(&ours).unwrap_or_else(|_| "[]".into());
            let businesses: Vec<Option<i64>> = conn
                .prepare_cached(
                    "UPDATE deliveries SET state = 'queued', lease_until = NULL, updated_at = ?1
                     WHERE state = 'sending' AND lease_until < ?1
                       AND id NOT IN (SELECT value FROM json_each(?2))
                     RETURNING business_id",
                )
                .and_then(|mut s| s.query_map(params![now, ours], |r| r.get(0))?.collect())
                .map_err(db_error)?;
            for &business in &businesses {
                count_move(business, DeliveryState::Sending, DeliveryState::Queued);
            }
            Ok(businesses.len() as u64)
        })
        .await
    }

    async fn held_businesses(&self) -> StoreResult<Vec<BusinessId>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT DISTINCT business_id FROM deliveries WHERE state = 'held'")
                .and_then(|mut s| s.query_map([], |r| Ok(BusinessId(r.get(0)?)))?.collect())
                .map_err(db_error)
        })
        .await
    }

    async fn release_held(&self, business: BusinessId, now: Millis) -> StoreResult<u64> {
        self.write(move |conn| {
            let n = conn
                .execute(
                    "UPDATE deliveries SET state = 'queued', next_attempt_at = ?2, updated_at = ?2
                     WHERE state = 'held' AND business_id = ?1",
                    params![business.0, now],
                )
                .map_err(db_error)? as i64;
            count(Some(business.0), DeliveryState::Held, -n);
            count(Some(business.0), DeliveryState::Queued, n);
            Ok(n as u64)
        })
        .await
    }

    async fn delivery(&self, id: i64) -> StoreResult<Option<(DeliveryRow, Vec<AttemptRow>)>> {
        self.read(move |conn| {
            let row = conn
                .query_row(
                    &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.id = ?1"),
                    [id],
                    delivery_row,
                )
                .optional()
                .map_err(db_error)?;
            let Some(row) = row else { return Ok(None) };
            let attempts = conn
                .prepare_cached(
                    "SELECT started_at, http_status, latency_ms, outcome, api_errors, error, method
                     FROM attempts WHERE delivery_id = ?1 ORDER BY id",
                )
                .and_then(|mut s| {
                    s.query_map([id], |r| {
                        let errors: String = r.get(4)?;
                        Ok(AttemptRow {
                            at: to_rfc3339(r.get(0)?),
                            http_status: r.get(1)?,
                            latency_ms: r.get(2)?,
                            outcome: r.get(3)?,
                            api_errors: serde_json::from_str(&errors).unwrap_or_default(),
                            error: r.get(5)?,
                            method: MarketMethod::parse(&r.get::<_, String>(6)?)
                                .unwrap_or(MarketMethod::SendMessage),
                        })
                    })?
                    .collect()
                })
                .map_err(db_error)?;
            Ok(Some((row, attempts)))
        })
        .await
    }

    async fn list_deliveries(&self, filter: DeliveryFilter) -> StoreResult<Vec<DeliveryRow>> {
        self.read(move |conn| {
            // Without statistics SQLite would walk the whole table in id
            // order rather than sort the few sending ones.
            let sending = filter.state == Some(DeliveryState::Sending);
            let mut sql = format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d {} JOIN events e ON e.id = d.event_id WHERE 1 = 1{}",
                if sending { "INDEXED BY deliveries_leased" } else { "" },
                filter.state_sql()
            );
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            let mut add = |clause: &str, value: rusqlite::types::Value| {
                args.push(value);
                sql.push_str(&format!(" AND {clause} ?{}", args.len()));
            };
            if let Some(b) = filter.business_id {
                add("d.business_id =", b.into());
            }
            if let Some(c) = filter.chat_id {
                add("d.chat_id =", c.into());
            }
            if let Some(o) = filter.order_id {
                add("d.context_type = 'ORDER' AND d.context_id =", o.into());
            }
            if let Some(r) = filter.return_id {
                add("d.context_type = 'RETURN' AND d.context_id =", r.into());
            }
            if let Some(r) = filter.route {
                add("d.route =", r.into());
            }
            if let Some(s) = filter.source {
                add("e.source =", s.into());
            }
            if let Some(t) = filter.since {
                add("d.created_at >=", t.into());
            }
            if let Some(t) = filter.until {
                add("d.created_at <", t.into());
            }
            if let Some(a) = filter.after_id {
                add("d.id >", a.into());
            }
            sql.push_str(&format!(" ORDER BY d.id LIMIT {}", filter.limit.max(1)));
            let mut stmt = conn.prepare(&sql).map_err(db_error)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), delivery_row)
                .and_then(|rows| rows.collect())
                .map_err(db_error)?;
            Ok(rows)
        })
        .await
    }

    async fn event(&self, id: i64) -> StoreResult<Option<StoredEvent>> {
        self.read(move |conn| event_by_id(conn, id)).await
    }

    async fn event_by_source_id(
        &self,
        source: String,
        external_id: String,
    ) -> StoreResult<Option<StoredEvent>> {
        self.read(move |conn| event_by_key(conn, &source, &external_id))
            .await
    }

    async fn recent_events(&self, limit: usize) -> StoreResult<Vec<StoredEvent>> {
        self.read(move |conn| {
            let ids: Vec<i64> = conn
                .prepare_cached("SELECT id FROM events ORDER BY id DESC LIMIT ?1")
                .and_then(|mut s| s.query_map([limit as i64], |r| r.get(0))?.collect())
                .map_err(db_error)?;
            let mut events = Vec::with_capacity(ids.len());
            for id in ids {
                events.extend(event_by_id(conn, id)?);
            }
            Ok(events)
        })
        .await
    }

    async fn requeue(&self, id: i64, message: RenderedMessage, now: Millis) -> StoreResult<()> {
        self.write(move |conn| {
            // The chat of an order is looked up again: a delivery that died
            // on `chats/new` asks again, one whose chat is known goes there.
            let at = Addressed::find(conn, message.business_id, message.target)?;
            let before = before_change(conn, id)?;
            let changed = conn
                .execute(
                    "UPDATE deliveries SET state = 'queued', business_id = ?2, chat_id = ?3, text = ?4,
                         reason = NULL, queued_at = ?5, next_attempt_at = ?5, updated_at = ?5,
                         context_type = ?6, context_id = ?7, conversation = ?8, closed_at = NULL
                     WHERE id = ?1 AND state IN ('failed', 'dead', 'cancelled')",
                    params![
                        id,
                        message.business_id.0,
                        at.chat,
                        message.text,
                        now,
                        at.context_type,
                        at.context_id,
                        at.conversation
                    ],
                )
                .map_err(db_error)?;
            if changed == 0 {
                return Err(StoreError::Conflict(format!(
                    "delivery {id} is not failed, dead or cancelled"
                )));
            }
            if let Some((business, from)) = before {
                count(business, from, -1);
                count(Some(message.business_id.0), DeliveryState::Queued, 1);
            }
            Ok(())
        })
        .await
    }

    async fn mark_failed(&self, id: i64, reason: String, now: Millis) -> StoreResult<()> {
        self.write(move |conn| {
            let before = before_change(conn, id)?;
            let changed = conn
                .execute(
                    "UPDATE deliveries SET state = 'failed', reason = ?2, updated_at = ?3
                     WHERE id = ?1 AND state IN ('failed', 'dead', 'cancelled')",
                    params![id, reason, now],
                )
                .map_err(db_error)?;
            if let (1, Some((business, from))) = (changed, before) {
                count_move(business, from, DeliveryState::Failed);
            }
            Ok(())
        })
        .await
    }

    async fn cancel(&self, id: i64, now: Millis) -> StoreResult<()> {
        self.write(move |conn| {
            let before = before_change(conn, id)?;
            let changed = conn
                .execute(
                    "UPDATE deliveries SET state = 'cancelled', reason = 'cancelled by an operator',
                         updated_at = ?2, closed_at = ?2
                     WHERE id = ?1 AND state IN ('queued', 'held')",
                    params![id, now],
                )
                .map_err(db_error)?;
            if changed == 0 {
                let exists = conn
                    .query_row("SELECT 1 FROM deliveries WHERE id = ?1", [id], |_| Ok(()))
                    .optional()
                    .map_err(db_error)?
                    .is_some();
                return Err(if exists {
                    StoreError::Conflict(format!(
                        "delivery {id} is not queued or held (a delivery being sent cannot be cancelled)"
                    ))
                } else {
                    StoreError::NotFound(format!("no delivery {id}"))
                });
            }
            if let Some((business, from)) = before {
                count_move(business, from, DeliveryState::Cancelled);
            }
            Ok(())
        })
        .await
    }

    async fn queue_summary(&self) -> StoreResult<Vec<BusinessQueue>> {
        // From the writer-kept counts (a few rows per business) and one
        // index probe per business for its oldest queued delivery: the
        // same answer as grouping every open delivery, at any queue size.
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT c.business_id,
                        SUM(CASE c.state WHEN 'queued' THEN c.n ELSE 0 END),
                        SUM(CASE c.state WHEN 'sending' THEN c.n ELSE 0 END),
                        SUM(CASE c.state WHEN 'held' THEN c.n ELSE 0 END),
                        SUM(CASE c.state WHEN 'dead' THEN c.n ELSE 0 END),
                        SUM(CASE c.state WHEN 'failed' THEN c.n ELSE 0 END),
                        (SELECT MIN(d.queued_at) FROM deliveries d INDEXED BY deliveries_queued_since
                         WHERE d.state = 'queued' AND d.business_id = c.business_id)
                 FROM delivery_counts c
                 WHERE c.business_id <> 0 AND c.n > 0
                   AND c.state IN ('queued', 'sending', 'held', 'dead', 'failed')
                 GROUP BY c.business_id ORDER BY c.business_id",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(BusinessQueue {
                        business_id: r.get(0)?,
                        queued: r.get(1)?,
                        sending: r.get(2)?,
                        held: r.get(3)?,
                        dead: r.get(4)?,
                        failed: r.get(5)?,
                        oldest_queued_at: r.get(6)?,
                    })
                })?
                .collect()
            })
            .map_err(db_error)
        })
        .await
    }

    async fn queue_waits(&self, business: BusinessId, now: Millis) -> StoreResult<QueueWaits> {
        self.read(move |conn| {
            conn.query_row(
                concat!(
                    "SELECT COALESCE(SUM(w.behind), 0), COALESCE(SUM(NOT w.behind AND w.due > ?2), 0)
                     FROM (SELECT d.next_attempt_at AS due, ",
                    behind_in_conversation!(),
                    " AS behind
                           FROM deliveries d INDEXED BY deliveries_due
                           WHERE d.state = 'queued' AND d.business_id = ?1) w"
                ),
                params![business.0, now],
                |r| {
                    Ok(QueueWaits {
                        behind_chat: r.get(0)?,
                        not_yet_due: r.get(1)?,
                    })
                },
            )
            .map_err(db_error)
        })
        .await
    }

    async fn state_counts(&self) -> StoreResult<Vec<(DeliveryState, i64)>> {
        // `delivered` grows without bound and is left out (count it with
        // chatbridge_deliveries_total).
        self.read(|conn| {
            let counted: Vec<(String, i64)> = conn
                .prepare_cached(
                    "SELECT state, SUM(n) FROM delivery_counts WHERE state <> 'delivered' GROUP BY state",
                )
                .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(db_error)?;
            Ok(open_state_counts(counted))
        })
        .await
    }

    async fn prune(&self, before: Millis, batch: usize) -> StoreResult<u64> {
        self.write(move |conn| {
            let ids: Vec<i64> = conn
                .prepare_cached(
                    "SELECT e.id FROM events e
                     WHERE e.received_at < ?1 AND NOT EXISTS (
                         SELECT 1 FROM deliveries d
                         WHERE d.event_id = e.id AND d.state IN ('queued', 'sending', 'held'))
                     ORDER BY e.received_at LIMIT ?2",
                )
                .and_then(|mut s| s.query_map(params![before, batch as i64], |r| r.get(0))?.collect())
                .map_err(db_error)?;
            let ids = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
            conn.execute(
                "DELETE FROM attempts WHERE delivery_id IN (
                     SELECT id FROM deliveries WHERE event_id IN (SELECT value FROM json_each(?1)))",
                [&ids],
            )
            .map_err(db_error)?;
            let gone: Vec<(Option<i64>, String, i64)> = conn
                .prepare_cached(
                    "SELECT business_id, state, COUNT(*) FROM deliveries
                     WHERE event_id IN (SELECT value FROM json_each(?1)) GROUP BY 1, 2",
                )
                .and_then(|mut s| {
                    s.query_map([&ids], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect()
                })
                .map_err(db_error)?;
            for (business, state, n) in gone {
                count(business, state_of(state), -n);
            }
            conn.execute("DELETE FROM deliveries WHERE event_id IN (SELECT value FROM json_each(?1))", [&ids])
                .map_err(db_error)?;
            // Pauses older than the retention count for nothing.
            conn.execute("DELETE FROM method_pauses WHERE until_at < ?1", [before])
                .map_err(db_error)?;
            conn.execute("DELETE FROM events WHERE id IN (SELECT value FROM json_each(?1))", [&ids])
                .map(|n| n as u64)
                .map_err(db_error)
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        // A committed write, through the writer like every other: a full
        // disk or a read-only file fails it, while a read would pass.
        self.write(|conn| {
            conn.execute(
                "INSERT INTO store_probe (id, probes) VALUES (1, 1)
                 ON CONFLICT (id) DO UPDATE SET probes = probes + 1",
                [],
            )
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    async fn campaign_business(&self, campaign: i64) -> StoreResult<Option<BusinessId>> {
        self.read(move |conn| {
            conn.query_row(
                "SELECT business_id FROM market_campaigns WHERE campaign_id = ?1",
                [campaign],
                |r| Ok(BusinessId(r.get(0)?)),
            )
            .optional()
            .map_err(db_error)
        })
        .await
    }

    async fn remember_campaign(
        &self,
        campaign: i64,
        business: BusinessId,
        now: Millis,
    ) -> StoreResult<()> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO market_campaigns (campaign_id, business_id, learnt_at)
                 VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![campaign, business.0, now],
            )
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    /// One process per file: its own webhooks and sends wake it.
    fn wake_on_work(&self, _wake: Arc<tokio::sync::Notify>) {}
}

#[cfg(test)]
mod batch_tests;
#[cfg(test)]
mod upgrade_tests;
