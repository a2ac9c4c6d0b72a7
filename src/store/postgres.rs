//! PostgreSQL backend: any number of `chatbridge serve` processes share one
//! database and behave like one process. The schema is
//! `postgres/schema.sql` (numbered migrations, run at start under an
//! advisory lock). Everything that must hold across processes is decided
//! in the database:
//! - `(source, external_id)` is a unique key: a webhook posted to two
//!   instances at once makes one event (`ON CONFLICT DO NOTHING`, then the
//!   stored one is read);
//! - a claim runs in one transaction under the business's exclusive
//!   advisory lock: it counts the business's `sending` rows (max_in_flight)
//!   and its quota slots in the window (the window's whole minutes from
//!   `quota_counts`, which triggers on `quota_slots` keep; its first,
//!   partial minute slot by slot),
//!   reads the methods' 420 pauses, then takes the due heads of their
//!   conversations `FOR UPDATE SKIP LOCKED` in one statement, writes a
//!   fresh claim token from a sequence and a quota slot per call; a
//!   dispatcher round claims for all its businesses in one transaction
//!   (`postgres/claims.rs`);
//! - inserts (and requeues) hold the same lock shared: ids come from a
//!   sequence and commits can land out of id order, so a claim waits for
//!   the inserts in progress of its business; otherwise it could take a
//!   later delivery of a conversation whose earlier one is not yet visible;
//! - `record`/`release` change a delivery only while it carries the
//!   claim's token; a 420 or a call that never left gives its quota slot
//!   back, any other answer moves the slot to the answer's time; a call
//!   whose process died keeps its slot while it is in flight and, once its
//!   lease is reclaimed, from the lease's end (the Market may have counted
//!   it that late), so a crash never frees a slot early.
//!
//! - whatever makes work due notifies the other instances on commit
//!   (LISTEN/NOTIFY, see `postgres/listen.rs`), so an instance wakes
//!   promptly when another accepts work.
//!
//! Within one process, the inserts and records made at the same moment
//! share one transaction, one commit and one notification per business
//! (group commit, `postgres/batch.rs`; their steps are in
//! `postgres/writes.rs`); a caller still hears back only after the commit
//! that holds its write. Several locks in one transaction are always taken
//! in the order of their keys (`writes::lock_for_events`).
//!
//! Connections come from a deadpool pool that lives on the store's own
//! runtime thread, so they do not die with the actix worker that happened
//! to open them; the listener's connection lives there too, outside the pool.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::*;
use crate::clock::to_rfc3339;
use crate::settings::StorageSettings;

mod batch;
mod claims;
mod listen;
mod pipelined;
mod writes;

use listen::announce;

const SCHEMA: &str = include_str!("postgres/schema.sql");
/// Advisory lock namespaces (the first key of the two-key form).
const MIGRATE_LOCK: i32 = 0x6362_0001;
const BUSINESS_LOCK: i32 = 0x6362_0002;
const SUBJECT_LOCK: i32 = 0x6362_0003;
/// Held by a dispatcher round while it claims for a business (tried, never
/// waited for: see `postgres/claims.rs`).
const CLAIM_LOCK: i32 = 0x6362_0004;

/// How many batches of inserts and records (see `postgres/batch.rs`) may
/// be written at once: a quarter of the pool, the rest left to claims and
/// reads. Two or more let one batch's statements run while another commits.
fn batches_at_once(pool_size: usize) -> usize {
    (pool_size / 4).clamp(1, 4)
}

pub struct PostgresStore {
    pool: Pool,
    runtime: tokio::runtime::Handle,
    /// What the listener connects with (see `listen`).
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    listening: std::sync::atomic::AtomicBool,
    /// Gathers inserts and records into shared transactions (group commit).
    batcher: batch::Batcher,
    /// Dropping it ends the runtime thread, closing every connection.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// What is wrong with a `postgres://` `storage.url`, said so that `check`,
/// `serve` and `store copy --to` refuse it alike, before connecting:
/// tokio-postgres' own parse error names only "invalid connection string",
/// and two mistakes parse fine but go wrong later (a database name left out
/// silently means the database named like the user, e.g. `postgres`; an `@`
/// in the password makes the rest of the password the host name). The
/// caller names the URL (redacted) before the text.
pub fn postgres_url_problem(url: &str) -> Option<String> {
    let config = match tokio_postgres::Config::from_str(url) {
        Ok(config) => config,
        Err(e) => {
            // The cause names the option (never its value, so no password).
            let why =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
            let hint = if why.contains("`sslmode`") {
                "sslmode may be disable, prefer or require (verify-ca and verify-full are not supported)"
            } else if why.contains("`port`") {
                "the port must be a number from 1 to 65535"
            } else if why.contains("unknown option") {
                "check its spelling (the ones often used: sslmode, connect_timeout, application_name)"
            } else {
                "write postgres://user:password@host:5432/database"
            };
            return Some(format!("not a PostgreSQL URL: {why}; {hint}"));
        }
    };
    let at_in_host = config.get_hosts().iter().any(|h| match h {
        tokio_postgres::config::Host::Tcp(name) => name.contains('@'),
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(_) => false,
    });
    if at_in_host {
        return Some(
            "the password or user name holds an @, so what follows it is read as the host; write each @ in them as %40"
                .into(),
        );
    }
    if config.get_dbname().is_none_or(str::is_empty) {
        return Some(
            "it names no database: write one after the host, postgres://user@host:5432/chatbridge (without one PostgreSQL picks the database named like the user, such as its maintenance database `postgres`)"
                .into(),
        );
    }
    None
}

pub(super) fn db_error(e: impl std::error::Error + 'static) -> StoreError {
    // tokio-postgres puts the server's message in the source chain.
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // deadpool prints its inner error and also returns it as the
        // source: said once, not "db error: db error: FATAL ...".
        let said = s.to_string();
        if !text.ends_with(&said) {
            text = format!("{text}: {said}");
        }
        source = s.source();
    }
    if out_of_reach(&e) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Database(text)
    }
}

/// Whether an error means the server cannot be reached or cannot take
/// writes now, so the call may succeed later unchanged: no connection from
/// the pool in time (the server is down), a lost connection or socket
/// error, and the server's own codes for that — class 08 (connection
/// exception), 57P01..57P03 (shutting down, crashed, starting up), class 53
/// (disk full, out of memory, too many connections), 25006 (read-only: a
/// standby after a failover). Anything else (a bad statement, a constraint)
/// is a mistake that waiting will not fix.
fn out_of_reach(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<deadpool_postgres::PoolError>() || e.is::<std::io::Error>() {
            return true;
        }
        if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
            if pg.is_closed() {
                return true;
            }
            if let Some(code) = pg.code() {
                let code = code.code();
                return code.starts_with("08")
                    || code.starts_with("53")
                    || matches!(code, "57P01" | "57P02" | "57P03" | "25006");
            }
        }
        next = e.source();
    }
    false
}

/// The first release split `schema.sql` on the text "-- migration ", which
/// its header comment also contains: it applied that comment as version 1,
/// so migration N is recorded as version N + 1 in every database it made.
/// Kept, so that it and this version agree on what a database has.
const VERSION_OFFSET: i32 = 1;

/// The migrations of `schema`, in order, as `(recorded version, sql)`. A
/// migration starts at a line that is exactly `-- migration N`; a mention
/// of one elsewhere (in a comment) starts nothing. Its numbers must run
/// 1, 2, 3...: a gap or a repeat is an error in the file.
fn parse_migrations(schema: &'static str) -> Result<Vec<(i32, &'static str)>, String> {
    let mut starts = Vec::new();
    let mut offset = 0;
    for line in schema.split_inclusive('\n') {
        let label = line.trim_end().strip_prefix("-- migration ");
        if let Some(n) = label.and_then(|n| n.trim().parse::<i32>().ok()) {
            starts.push((n, offset, offset + line.len()));
        }
        offset += line.len();
    }
    let mut parts = Vec::with_capacity(starts.len());
    for (i, &(n, _, body)) in starts.iter().enumerate() {
        if n != i as i32 + 1 {
            return Err(format!(
                "schema.sql: migration {} is labelled {n}; number them 1, 2, 3... in order",
                i + 1
            ));
        }
        let end = starts
            .get(i + 1)
            .map_or(schema.len(), |&(_, start, _)| start);
        parts.push((n + VERSION_OFFSET, &schema[body..end]));
    }
    Ok(parts)
}

fn migrations() -> StoreResult<Vec<(i32, &'static str)>> {
    parse_migrations(SCHEMA).map_err(StoreError::Database)
}

/// TLS as libpq does it for `sslmode=prefer` (the default) and `require`:
/// the connection is encrypted, the server's certificate is not checked
/// against a CA (managed databases use their own CAs; libpq checks only for
/// `verify-ca`/`verify-full`, which tokio-postgres does not parse). The
/// handshake's signatures are still verified.
fn tls() -> StoreResult<tokio_postgres_rustls::MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Database(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl PostgresStore {
    /// Connects, runs the migrations this version has not seen, and keeps
    /// a pool of `storage.pool_size` connections. Blocks until done.
    pub fn open(settings: &StorageSettings) -> StoreResult<Self> {
        if let Some(problem) = postgres_url_problem(&settings.url) {
            return Err(StoreError::Database(format!(
                "{}: {problem}",
                redact_url(&settings.url)
            )));
        }
        let mut config = tokio_postgres::Config::from_str(&settings.url).map_err(|e| {
            StoreError::Database(format!(
                "{} is not a PostgreSQL URL: {e}",
                redact_url(&settings.url)
            ))
        })?;
        config.connect_timeout(Duration::from_secs(settings.connect_timeout_secs));
        if config.get_application_name().is_none() {
            config.application_name("chatbridge");
        }
        let tls = tls()?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let timeout = Some(Duration::from_secs(settings.connect_timeout_secs));
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(db_error)?;
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("postgres".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| StoreError::Database(format!("cannot start the store thread: {e}")))?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| StoreError::Closed)?
            .map_err(|e| StoreError::Database(format!("cannot start the store runtime: {e}")))?;
        let batcher =
            batch::Batcher::start(&runtime, pool.clone(), batches_at_once(settings.pool_size));
        let store = Self {
            pool,
            batcher,
            runtime,
            config,
            tls,
            listening: Default::default(),
            _stop: stop,
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let pool = store.pool.clone();
        store.runtime.spawn(async move {
            let _ = done_tx.send(migrate(&pool).await);
        });
        done_rx.recv().map_err(|_| StoreError::Closed)??;
        Ok(store)
    }

    /// Runs `work` with a pooled connection on the store's runtime.
    async fn with<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c mut Object,
            )
                -> std::pin::Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'c>>
            + Send
            + 'static,
    {
        let pool = self.pool.clone();
        self.runtime
            .spawn(async move {
                let mut client = pool.get().await.map_err(db_error)?;
                work(&mut client).await
            })
            .await
            .map_err(|e| StoreError::Database(format!("store task failed: {e}")))?
    }
}

impl PostgresStore {
    /// For code that runs outside any async runtime (`store copy`, and the
    /// check in `store::open` that no copy is half done): runs `work` with
    /// a pooled connection on the store's runtime and waits for it.
    pub(super) fn run_sync<T, F, Fut>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = StoreResult<T>> + Send + 'static,
    {
        let pool = self.pool.clone();
        let (done, result) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let outcome = match pool.get().await {
                Ok(client) => work(client).await,
                Err(e) => Err(db_error(e)),
            };
            let _ = done.send(outcome);
        });
        result.recv().map_err(|_| StoreError::Closed)?
    }
}

use std::future::Future;

/// Deliveries per business and state (`delivered` excepted), with the
/// oldest queued time of each business: one statement whose every part is
/// an index-only scan of a partial index (`deliveries_queued_since`,
/// `deliveries_sending`, `deliveries_held`, `deliveries_stopped`), so it
/// reads no table rows and nothing of the delivered ones. Counting the
/// queued still visits one index entry each: with 1,000,000 queued it is
/// the price of one refresh of the gauges (README, "Performance").
async fn open_counts(
    c: &impl GenericClient,
) -> StoreResult<Vec<(Option<i64>, String, i64, Option<Millis>)>> {
    Ok(c.query(
        "SELECT business_id, 'queued', COUNT(*), MIN(queued_at)
               FROM deliveries WHERE state = 'queued' GROUP BY business_id
             UNION ALL
             SELECT business_id, 'sending', COUNT(*), NULL
               FROM deliveries WHERE state = 'sending' GROUP BY business_id
             UNION ALL
             SELECT business_id, 'held', COUNT(*), NULL
               FROM deliveries WHERE state = 'held' GROUP BY business_id
             UNION ALL
             SELECT business_id, state, COUNT(*), NULL
               FROM deliveries WHERE state IN ('dead', 'failed', 'cancelled')
               GROUP BY business_id, state",
        &[],
    )
    .await
    .map_err(db_error)?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect())
}

/// The gauges from [`open_counts`]: the same shape SQLite answers.
fn gauges_of(counts: Vec<(Option<i64>, String, i64, Option<Millis>)>) -> QueueGauges {
    let mut businesses: std::collections::BTreeMap<i64, BusinessQueue> = Default::default();
    let mut states: std::collections::HashMap<String, i64> = Default::default();
    for (business, state, n, oldest) in counts {
        *states.entry(state.clone()).or_default() += n;
        let Some(business_id) = business else {
            continue;
        };
        if state == "cancelled" {
            continue;
        }
        let b = businesses
            .entry(business_id)
            .or_insert_with(|| BusinessQueue {
                business_id,
                ..Default::default()
            });
        match state.as_str() {
            "queued" => {
                b.queued = n;
                b.oldest_queued_at = oldest;
            }
            "sending" => b.sending = n,
            "held" => b.held = n,
            "dead" => b.dead = n,
            _ => b.failed = n,
        }
    }
    QueueGauges {
        businesses: businesses.into_values().collect(),
        states: open_state_counts(states),
    }
}

async fn migrate(pool: &Pool) -> StoreResult<()> {
    let mut client = pool.get().await.map_err(db_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&MIGRATE_LOCK])
        .await
        .map_err(db_error)?;
    // Without the NOTICE "already exists, skipping" at every start.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS chatbridge_schema (version INTEGER NOT NULL)",
    )
    .await
    .map_err(db_error)?;
    let version: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM chatbridge_schema",
            &[],
        )
        .await
        .map_err(db_error)?
        .get(0);
    let scripts = migrations()?;
    let newest = scripts.last().map_or(0, |&(v, _)| v);
    if version > newest {
        return Err(StoreError::Database(format!(
            "the database schema is version {version}, newer than this chatbridge knows ({newest}); upgrade chatbridge"
        )));
    }
    if version == 0 {
        // A database chatbridge has never migrated: refuse one whose tables
        // would collide with ours rather than fail half-way through.
        let foreign: Vec<String> = tx
            .query(
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = current_schema()
                   AND table_name IN ('events', 'deliveries', 'attempts', 'chat_contexts',
                                      'quota_slots', 'method_pauses', 'market_campaigns')
                 ORDER BY table_name",
                &[],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !foreign.is_empty() {
            return Err(StoreError::Conflict(format!(
                "the database already holds tables chatbridge did not make ({}); give chatbridge \
                 a database (or schema) of its own",
                foreign.join(", ")
            )));
        }
    }
    for &(v, script) in scripts.iter().filter(|&&(v, _)| v > version) {
        tx.batch_execute(script).await.map_err(db_error)?;
        tx.execute("INSERT INTO chatbridge_schema (version) VALUES ($1)", &[&v])
            .await
            .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)
}

fn state_of(raw: &str) -> DeliveryState {
    DeliveryState::parse(raw).unwrap_or(DeliveryState::Failed)
}

fn context_of(kind: Option<String>, id: Option<i64>) -> Option<ChatContext> {
    Some(ChatContext {
        kind: crate::domain::ContextKind::parse(&kind?)?,
        id: id?,
    })
}

/// Serialises claims of a business against each other (exclusive) and
/// against the inserts of its deliveries (shared): see the module docs.
async fn lock_business(c: &impl GenericClient, business: i64, exclusive: bool) -> StoreResult<()> {
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock($1, hashint8($2))"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1, hashint8($2))"
    };
    c.execute(sql, &[&BUSINESS_LOCK, &business])
        .await
        .map_err(db_error)?;
    Ok(())
}

async fn event_by_key(
    c: &impl GenericClient,
    source: &str,
    external_id: &str,
) -> StoreResult<Option<StoredEvent>> {
    let row = c
        .query_opt(
            "SELECT id FROM events WHERE source = $1 AND external_id = $2",
            &[&source, &external_id],
        )
        .await
        .map_err(db_error)?;
    match row {
        Some(r) => event_by_id(c, r.get(0)).await,
        None => Ok(None),
    }
}

async fn event_by_id(c: &impl GenericClient, id: i64) -> StoreResult<Option<StoredEvent>> {
    let Some(r) = c
        .query_opt(
            "SELECT id, source, external_id, event_type, payload, received_at, business_id
             FROM events WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(db_error)?
    else {
        return Ok(None);
    };
    let deliveries = c
        .query(
            "SELECT id, route, state FROM deliveries WHERE event_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .map_err(db_error)?
        .iter()
        .map(|d| DeliverySummary {
            id: d.get(0),
            route: d.get(1),
            state: state_of(d.get(2)),
        })
        .collect();
    Ok(Some(StoredEvent {
        id: r.get(0),
        source: r.get(1),
        external_id: r.get(2),
        event_type: r.get(3),
        payload: r.get(4),
        received_at: r.get(5),
        deliveries,
        business_id: r.get::<_, Option<i64>>(6).map(BusinessId),
    }))
}

const DELIVERY_COLUMNS: &str = "d.id, d.event_id, e.source, e.event_type, d.route, d.template, d.business_id, \
     d.chat_id, d.state, d.reason, d.attempts, d.created_at, d.next_attempt_at, d.delivered_at, d.text, \
     d.context_type, d.context_id";

fn delivery_row(r: &Row) -> DeliveryRow {
    let context = context_of(r.get(15), r.get(16));
    DeliveryRow {
        id: r.get(0),
        event_id: r.get(1),
        source: r.get(2),
        event_type: r.get(3),
        route: r.get(4),
        template: r.get(5),
        business_id: r.get(6),
        chat_id: r.get(7),
        state: state_of(r.get(8)),
        reason: r.get(9),
        attempts: r.get(10),
        created_at: to_rfc3339(r.get(11)),
        next_attempt_at: to_rfc3339(r.get(12)),
        delivered_at: r.get::<_, Option<i64>>(13).map(to_rfc3339),
        text: r.get(14),
        order_id: context
            .filter(|c| c.kind == crate::domain::ContextKind::Order)
            .map(|c| c.id),
        return_id: context
            .filter(|c| c.kind == crate::domain::ContextKind::Return)
            .map(|c| c.id),
    }
}

async fn known_chat(
    c: &impl GenericClient,
    business: BusinessId,
    context: ChatContext,
) -> StoreResult<Option<ChatId>> {
    Ok(c.query_opt(
        "SELECT chat_id FROM chat_contexts
             WHERE business_id = $1 AND context_type = $2 AND context_id = $3",
        &[&business.0, &context.kind.as_str(), &context.id],
    )
    .await
    .map_err(db_error)?
    .map(|r| ChatId(r.get(0))))
}

/// A delivery's chat, context and conversation columns (as in sqlite.rs).
#[derive(Default)]
struct Addressed {
    chat: Option<i64>,
    context_type: Option<&'static str>,
    context_id: Option<i64>,
    conversation: Option<String>,
}

impl Addressed {
    async fn find(
        c: &impl GenericClient,
        business: BusinessId,
        target: Target,
    ) -> StoreResult<Self> {
        let (chat, context) = match target {
            Target::Chat(chat) => (Some(chat), None),
            Target::Context(ctx) => (known_chat(c, business, ctx).await?, Some(ctx)),
        };
        Ok(Self {
            chat: chat.map(|c| c.0),
            context_type: context.map(|c| c.kind.as_str()),
            context_id: context.map(|c| c.id),
            conversation: crate::domain::conversation_key(chat, context),
        })
    }
}

/// Remembers the chat of an order or return and moves its open deliveries
/// into the chat's conversation. Runs under the business's exclusive lock.
async fn remember_chat(
    c: &impl GenericClient,
    business: BusinessId,
    context: ChatContext,
    chat: ChatId,
    now: Millis,
) -> StoreResult<()> {
    c.execute(
        "INSERT INTO chat_contexts (business_id, context_type, context_id, chat_id, found_at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        &[
            &business.0,
            &context.kind.as_str(),
            &context.id,
            &chat.0,
            &now,
        ],
    )
    .await
    .map_err(db_error)?;
    let from = crate::domain::conversation_key(None, Some(context));
    let to = crate::domain::conversation_key(Some(chat), None);
    c.execute(
        "UPDATE deliveries SET chat_id = $4, conversation = $5, updated_at = $6
         WHERE business_id = $1 AND conversation = $2 AND chat_id IS NULL
           AND state IN ('queued', 'sending', 'held') AND context_type = $3",
        &[
            &business.0,
            &from,
            &context.kind.as_str(),
            &chat.0,
            &to,
            &now,
        ],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Why an event about `ordering.subject` must send nothing: a stored event
/// of the same source and subject happened later (as in sqlite.rs).
async fn later_news(
    c: &impl GenericClient,
    source: &str,
    ordering: &EventOrdering,
    this_event: i64,
) -> StoreResult<Option<String>> {
    let later = c
        .query_opt(
            "SELECT id, event_type, happened_at FROM events
             WHERE source = $1 AND subject = $2 AND happened_at > $3 AND id <> $4
             ORDER BY happened_at DESC LIMIT 1",
            &[
                &source,
                &ordering.subject,
                &ordering.happened_at,
                &this_event,
            ],
        )
        .await
        .map_err(db_error)?;
    Ok(later.map(|r| {
        let (id, event_type, at): (i64, String, i64) = (r.get(0), r.get(1), r.get(2));
        stale_reason(ordering, id, &event_type, at)
    }))
}

/// `d` is the first open delivery of its conversation. Written as "its id
/// is the conversation's first open id" (one index probe), not as NOT
/// EXISTS: without fresh statistics the planner turned that into a scan of
/// the business's whole queue per row.
const HEAD: &str = "d.id = COALESCE((
    SELECT p.id FROM deliveries p
    WHERE p.business_id = d.business_id AND p.conversation = d.conversation
      AND p.state IN ('queued', 'sending', 'held')
    ORDER BY p.id LIMIT 1), d.id)";

const CLAIMED_COLUMNS: &str =
    "u.id, u.route, u.business_id, u.chat_id, u.text, u.attempts, u.queued_at, \
     u.context_type, u.context_id, u.claim_token";

fn claimed_row(r: &Row) -> Claimed {
    Claimed {
        id: r.get(0),
        route: r.get(1),
        business_id: BusinessId(r.get(2)),
        chat_id: r.get::<_, Option<i64>>(3).map(ChatId),
        text: r.get::<_, Option<String>>(4).unwrap_or_default(),
        attempts: r.get(5),
        queued_at: r.get(6),
        context: context_of(r.get(7), r.get(8)),
        claim_token: r.get(9),
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_event(&self, event: NewEvent) -> StoreResult<Inserted> {
        self.batcher.insert(event).await
    }

    async fn queued_businesses(&self) -> StoreResult<Vec<(BusinessId, Millis)>> {
        // A skip scan over the due index: one probe per business.
        self.with(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "WITH RECURSIVE b(id) AS (
                            SELECT (SELECT MIN(business_id) FROM deliveries WHERE state = 'queued')
                            UNION ALL
                            SELECT (SELECT MIN(business_id) FROM deliveries
                                    WHERE state = 'queued' AND business_id > b.id)
                            FROM b WHERE b.id IS NOT NULL
                         )
                         SELECT id, (SELECT MIN(next_attempt_at) FROM deliveries
                                     WHERE state = 'queued' AND business_id = b.id)
                         FROM b WHERE id IS NOT NULL",
                        &[],
                    )
                    .await
                    .map_err(db_error)?;
                Ok(rows
                    .iter()
                    .map(|r| (BusinessId(r.get(0)), r.get(1)))
                    .collect())
            })
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
        self.with(move |client| {
            Box::pin(async move {
                claims::claim(client, business, now, lease_until, limits, held).await
            })
        })
        .await
    }

    async fn claim_round(
        &self,
        wanted: Vec<(BusinessId, ClaimLimits)>,
        now: Millis,
        lease_until: Millis,
    ) -> StoreResult<Vec<RoundClaim>> {
        self.with(move |client| {
            Box::pin(async move { claims::claim_round(client, &wanted, now, lease_until).await })
        })
        .await
    }

    async fn next_due(&self, business: BusinessId, now: Millis) -> StoreResult<Option<Millis>> {
        self.with(move |c| Box::pin(async move { claims::next_due_in(&*c, business, now).await }))
            .await
    }

    async fn method_pauses(
        &self,
        business: BusinessId,
        now: Millis,
    ) -> StoreResult<Vec<MethodPause>> {
        self.with(move |c| {
            Box::pin(async move {
                Ok(c.query(
                    "SELECT method, until_at, reason FROM method_pauses
                     WHERE business_id = $1 AND until_at > $2",
                    &[&business.0, &now],
                )
                .await
                .map_err(db_error)?
                .iter()
                .filter_map(|r| {
                    Some(MethodPause {
                        method: MarketMethod::parse(r.get(0))?,
                        until: r.get(1),
                        reason: PauseReason::parse(r.get(2)).unwrap_or(PauseReason::Market420),
                    })
                })
                .collect())
            })
        })
        .await
    }

    async fn record(&self, attempt: Attempt, now: Millis) -> StoreResult<()> {
        if !writes::record_needs_lock(&attempt) {
            return self.batcher.record(attempt, now).await;
        }
        self.with(move |client| {
            Box::pin(async move { writes::record_alone(client, &attempt, now).await })
        })
        .await
    }

    async fn release(&self, ids: Vec<(i64, i64)>, now: Millis) -> StoreResult<()> {
        self.with(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(db_error)?;
                let mut released = 0;
                for (id, token) in ids {
                    released += tx.execute(
                        "UPDATE deliveries SET state = 'queued', lease_until = NULL, updated_at = $2
                         WHERE id = $1 AND state = 'sending' AND claim_token = $3",
                        &[&id, &now, &token],
                    )
                    .await
                    .map_err(db_error)?;
                    // Never sent: the Market did not count it.
                    tx.execute("DELETE FROM quota_slots WHERE claim_token = $1", &[&token])
                        .await
                        .map_err(db_error)?;
                }
                if released > 0 {
                    announce(&tx, None).await?;
                }
                tx.commit().await.map_err(db_error)
            })
        })
        .await
    }

    async fn calls_since(
        &self,
        business: BusinessId,
        method: MarketMethod,
        since: Millis,
    ) -> StoreResult<Vec<Millis>> {
        // The slots of every process, in flight ones included.
        self.with(move |c| {
            Box::pin(async move {
                Ok(c.query(
                    "SELECT taken_at FROM quota_slots
                     WHERE business_id = $1 AND method = $2 AND taken_at > $3 ORDER BY taken_at",
                    &[&business.0, &method.as_str(), &since],
                )
                .await
                .map_err(db_error)?
                .iter()
                .map(|r| r.get(0))
                .collect())
            })
        })
        .await
    }

    async fn known_chat(
        &self,
        business: BusinessId,
        context: ChatContext,
    ) -> StoreResult<Option<ChatId>> {
        self.with(move |c| Box::pin(async move { known_chat(&*c, business, context).await }))
            .await
    }

    async fn reclaim_expired(&self, now: Millis, ours: Vec<i64>) -> StoreResult<u64> {
        self.with(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(db_error)?;
                // The Market may have counted a lost call as late as its
                // lease's end (see `method_room`): its slot counts from there.
                let n = tx
                    .execute(
                        "WITH lost AS (
                             SELECT id, claim_token, lease_until FROM deliveries
                             WHERE state = 'sending' AND lease_until < $1 AND NOT (id = ANY($2))
                             FOR UPDATE SKIP LOCKED),
                         slots AS (
                             UPDATE quota_slots q SET taken_at = GREATEST(q.taken_at, lost.lease_until)
                             FROM lost WHERE q.claim_token = lost.claim_token)
                         UPDATE deliveries d SET state = 'queued', lease_until = NULL, updated_at = $1
                         FROM lost WHERE d.id = lost.id",
                        &[&now, &ours],
                    )
                    .await
                    .map_err(db_error)?;
                if n > 0 {
                    announce(&tx, None).await?;
                }
                tx.commit().await.map_err(db_error)?;
                Ok(n)
            })
        })
        .await
    }

    async fn held_businesses(&self) -> StoreResult<Vec<BusinessId>> {
        self.with(|c| {
            Box::pin(async move {
                Ok(c.query(
                    "SELECT DISTINCT business_id FROM deliveries WHERE state = 'held'",
                    &[],
                )
                .await
                .map_err(db_error)?
                .iter()
                .map(|r| BusinessId(r.get(0)))
                .collect())
            })
        })
        .await
    }

    async fn release_held(&self, business: BusinessId, now: Millis) -> StoreResult<u64> {
        self.with(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(db_error)?;
                let n = tx
                    .execute(
                        "UPDATE deliveries SET state = 'queued', next_attempt_at = $2, updated_at = $2
                         WHERE state = 'held' AND business_id = $1",
                        &[&business.0, &now],
                    )
                    .await
                    .map_err(db_error)?;
                if n > 0 {
                    announce(&tx, Some(business.0)).await?;
                }
                tx.commit().await.map_err(db_error)?;
                Ok(n)
            })
        })
        .await
    }

    async fn delivery(&self, id: i64) -> StoreResult<Option<(DeliveryRow, Vec<AttemptRow>)>> {
        self.with(move |c| {
            Box::pin(async move {
                let Some(row) = c
                    .query_opt(
                        &format!(
                            "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id
                             WHERE d.id = $1"
                        ),
                        &[&id],
                    )
                    .await
                    .map_err(db_error)?
                else {
                    return Ok(None);
                };
                let attempts = c
                    .query(
                        "SELECT started_at, http_status, latency_ms, outcome, api_errors, error, method
                         FROM attempts WHERE delivery_id = $1 ORDER BY id",
                        &[&id],
                    )
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(|r| AttemptRow {
                        at: to_rfc3339(r.get(0)),
                        http_status: r.get::<_, Option<i32>>(1).map(|s| s as u16),
                        latency_ms: r.get(2),
                        outcome: r.get(3),
                        api_errors: serde_json::from_str(r.get(4)).unwrap_or_default(),
                        error: r.get(5),
                        method: MarketMethod::parse(r.get(6)).unwrap_or(MarketMethod::SendMessage),
                    })
                    .collect();
                Ok(Some((delivery_row(&row), attempts)))
            })
        })
        .await
    }

    async fn list_deliveries(&self, filter: DeliveryFilter) -> StoreResult<Vec<DeliveryRow>> {
        self.with(move |c| {
            Box::pin(async move {
                let mut sql = format!(
                    "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id WHERE TRUE{}",
                    filter.state_sql()
                );
                let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
                let mut add = |clause: &str, value: Box<dyn ToSql + Sync + Send>| {
                    args.push(value);
                    sql.push_str(&format!(" AND {clause} ${}", args.len()));
                };
                if let Some(b) = filter.business_id {
                    add("d.business_id =", Box::new(b));
                }
                if let Some(ch) = filter.chat_id {
                    add("d.chat_id =", Box::new(ch));
                }
                if let Some(o) = filter.order_id {
                    add("d.context_type = 'ORDER' AND d.context_id =", Box::new(o));
                }
                if let Some(r) = filter.return_id {
                    add("d.context_type = 'RETURN' AND d.context_id =", Box::new(r));
                }
                if let Some(r) = filter.route {
                    add("d.route =", Box::new(r));
                }
                if let Some(s) = filter.source {
                    add("e.source =", Box::new(s));
                }
                if let Some(t) = filter.since {
                    add("d.created_at >=", Box::new(t));
                }
                if let Some(t) = filter.until {
                    add("d.created_at <", Box::new(t));
                }
                if let Some(a) = filter.after_id {
                    add("d.id >", Box::new(a));
                }
                sql.push_str(&format!(" ORDER BY d.id LIMIT {}", filter.limit.max(1)));
                let params: Vec<&(dyn ToSql + Sync)> =
                    args.iter().map(|a| &**a as &(dyn ToSql + Sync)).collect();
                Ok(c.query(&sql, &params)
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(delivery_row)
                    .collect())
            })
        })
        .await
    }

    async fn event(&self, id: i64) -> StoreResult<Option<StoredEvent>> {
        self.with(move |c| Box::pin(async move { event_by_id(&*c, id).await }))
            .await
    }

    async fn event_by_source_id(
        &self,
        source: String,
        external_id: String,
    ) -> StoreResult<Option<StoredEvent>> {
        self.with(move |c| Box::pin(async move { event_by_key(&*c, &source, &external_id).await }))
            .await
    }

    async fn recent_events(&self, limit: usize) -> StoreResult<Vec<StoredEvent>> {
        self.with(move |c| {
            Box::pin(async move {
                let ids: Vec<i64> = c
                    .query(
                        "SELECT id FROM events ORDER BY id DESC LIMIT $1",
                        &[&(limit as i64)],
                    )
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let mut events = Vec::with_capacity(ids.len());
                for id in ids {
                    events.extend(event_by_id(&*c, id).await?);
                }
                Ok(events)
            })
        })
        .await
    }

    async fn requeue(&self, id: i64, message: RenderedMessage, now: Millis) -> StoreResult<()> {
        self.with(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(db_error)?;
                lock_business(&tx, message.business_id.0, false).await?;
                let at = Addressed::find(&tx, message.business_id, message.target).await?;
                let changed = tx
                    .execute(
                        "UPDATE deliveries SET state = 'queued', business_id = $2, chat_id = $3, text = $4,
                             reason = NULL, queued_at = $5, next_attempt_at = $5, updated_at = $5,
                             context_type = $6, context_id = $7, conversation = $8
                         WHERE id = $1 AND state IN ('failed', 'dead', 'cancelled')",
                        &[
                            &id,
                            &message.business_id.0,
                            &at.chat,
                            &message.text,
                            &now,
                            &at.context_type,
                            &at.context_id,
                            &at.conversation,
                        ],
                    )
                    .await
                    .map_err(db_error)?;
                if changed == 0 {
                    return Err(StoreError::Conflict(format!(
                        "delivery {id} is not failed, dead or cancelled"
                    )));
                }
                announce(&tx, Some(message.business_id.0)).await?;
                tx.commit().await.map_err(db_error)
            })
        })
        .await
    }

    async fn mark_failed(&self, id: i64, reason: String, now: Millis) -> StoreResult<()> {
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE deliveries SET state = 'failed', reason = $2, updated_at = $3
                     WHERE id = $1 AND state IN ('failed', 'dead', 'cancelled')",
                    &[&id, &reason, &now],
                )
                .await
                .map(|_| ())
                .map_err(db_error)
            })
        })
        .await
    }

    async fn cancel(&self, id: i64, now: Millis) -> StoreResult<()> {
        self.with(move |c| {
            Box::pin(async move {
                let cancelled = c
                    .query_opt(
                        "UPDATE deliveries SET state = 'cancelled', reason = 'cancelled by an operator',
                             updated_at = $2
                         WHERE id = $1 AND state IN ('queued', 'held')
                         RETURNING business_id",
                        &[&id, &now],
                    )
                    .await
                    .map_err(db_error)?;
                if let Some(row) = cancelled {
                    // The next message of its conversation may go now.
                    announce(c, row.get(0)).await?;
                    return Ok(());
                }
                let exists = c
                    .query_opt("SELECT 1 FROM deliveries WHERE id = $1", &[&id])
                    .await
                    .map_err(db_error)?
                    .is_some();
                Err(if exists {
                    StoreError::Conflict(format!(
                        "delivery {id} is not queued or held (a delivery being sent cannot be cancelled)"
                    ))
                } else {
                    StoreError::NotFound(format!("no delivery {id}"))
                })
            })
        })
        .await
    }

    async fn queue_summary(&self) -> StoreResult<Vec<BusinessQueue>> {
        Ok(self.queue_gauges().await?.businesses)
    }

    async fn state_counts(&self) -> StoreResult<Vec<(DeliveryState, i64)>> {
        Ok(self.queue_gauges().await?.states)
    }

    async fn queue_gauges(&self) -> StoreResult<QueueGauges> {
        let counts = self
            .with(|c| Box::pin(async move { open_counts(&*c).await }))
            .await?;
        Ok(gauges_of(counts))
    }

    fn changed_by_other_processes(&self) -> bool {
        true
    }

    async fn prune(&self, before: Millis, batch: usize) -> StoreResult<u64> {
        self.with(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(db_error)?;
                let ids: Vec<i64> = tx
                    .query(
                        "SELECT e.id FROM events e
                         WHERE e.received_at < $1 AND NOT EXISTS (
                             SELECT 1 FROM deliveries d
                             WHERE d.event_id = e.id AND d.state IN ('queued', 'sending', 'held'))
                         ORDER BY e.received_at LIMIT $2
                         FOR UPDATE SKIP LOCKED",
                        &[&before, &(batch as i64)],
                    )
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                tx.execute(
                    "DELETE FROM attempts WHERE delivery_id IN (
                         SELECT id FROM deliveries WHERE event_id = ANY($1))",
                    &[&ids],
                )
                .await
                .map_err(db_error)?;
                tx.execute("DELETE FROM deliveries WHERE event_id = ANY($1)", &[&ids])
                    .await
                    .map_err(db_error)?;
                let n = tx
                    .execute("DELETE FROM events WHERE id = ANY($1)", &[&ids])
                    .await
                    .map_err(db_error)?;
                // Slots and pauses older than the retention count for nothing.
                tx.execute("DELETE FROM quota_slots WHERE taken_at < $1", &[&before])
                    .await
                    .map_err(db_error)?;
                // Their minutes are empty now.
                tx.execute(
                    "DELETE FROM quota_counts WHERE minute + 60000 <= $1",
                    &[&before],
                )
                .await
                .map_err(db_error)?;
                tx.execute("DELETE FROM method_pauses WHERE until_at < $1", &[&before])
                    .await
                    .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                Ok(n)
            })
        })
        .await
    }

    async fn campaign_business(&self, campaign: i64) -> StoreResult<Option<BusinessId>> {
        self.with(move |c| {
            Box::pin(async move {
                Ok(c.query_opt(
                    "SELECT business_id FROM market_campaigns WHERE campaign_id = $1",
                    &[&campaign],
                )
                .await
                .map_err(db_error)?
                .map(|r| BusinessId(r.get(0))))
            })
        })
        .await
    }

    async fn remember_campaign(
        &self,
        campaign: i64,
        business: BusinessId,
        now: Millis,
    ) -> StoreResult<()> {
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO market_campaigns (campaign_id, business_id, learnt_at)
                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&campaign, &business.0, &now],
                )
                .await
                .map(|_| ())
                .map_err(db_error)
            })
        })
        .await
    }

    async fn queue_waits(&self, business: BusinessId, now: Millis) -> StoreResult<QueueWaits> {
        self.with(move |c| {
            Box::pin(async move {
                let r = c
                    .query_one(
                        &format!(
                            "SELECT COUNT(*) FILTER (WHERE NOT ({HEAD})),
                                    COUNT(*) FILTER (WHERE ({HEAD}) AND d.next_attempt_at > $2)
                             FROM deliveries d WHERE d.state = 'queued' AND d.business_id = $1"
                        ),
                        &[&business.0, &now],
                    )
                    .await
                    .map_err(db_error)?;
                Ok(QueueWaits {
                    behind_chat: r.get(0),
                    not_yet_due: r.get(1),
                })
            })
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.with(|c| {
            Box::pin(async move {
                c.query_one("SELECT 1", &[]).await.map_err(db_error)?;
                Ok(())
            })
        })
        .await
    }

    fn wake_on_work(&self, wake: Arc<tokio::sync::Notify>) {
        // One listener per store, however often this is asked.
        if self
            .listening
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        self.runtime
            .spawn(listen::listen(self.config.clone(), self.tls.clone(), wake));
    }
}

#[cfg(test)]
mod tests {
    use super::{migrations, parse_migrations, VERSION_OFFSET};

    #[test]
    fn each_numbered_part_of_the_schema_is_one_migration_and_a_mention_in_a_comment_is_none() {
        let parts = parse_migrations(
            "-- Parts between `-- migration N` lines run once.\n-- migration 1\nCREATE TABLE a (x INT);\n\
             -- a comment about -- migration 3\n-- migration 2\nALTER TABLE a ADD y INT;\n",
        )
        .unwrap();
        assert_eq!(
            parts,
            [
                (
                    1 + VERSION_OFFSET,
                    "CREATE TABLE a (x INT);\n-- a comment about -- migration 3\n"
                ),
                (2 + VERSION_OFFSET, "ALTER TABLE a ADD y INT;\n"),
            ]
        );
        let err =
            parse_migrations("-- migration 1\nSELECT 1;\n-- migration 3\nSELECT 3;\n").unwrap_err();
        assert!(err.contains("labelled 3"), "{err}");
    }

    #[test]
    fn the_shipped_schema_keeps_the_versions_databases_already_have() {
        let parts = migrations().unwrap();
        // Made by the first release: migration 1 is version 2, 2 is 3.
        assert_eq!(parts[0].0, 2);
        assert!(parts[0].1.contains("CREATE TABLE events"), "{}", parts[0].1);
        assert!(parts[1].1.contains("CREATE TABLE market_campaigns"));
        assert!(parts.iter().all(|(_, sql)| !sql.trim().is_empty()));
    }
}
