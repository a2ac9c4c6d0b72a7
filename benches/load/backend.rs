//! Where a phase keeps its store: a SQLite file in the run's folder, or a
//! PostgreSQL database made for the phase and dropped when the run ends
//! (`BENCH_POSTGRES_URL`, else `CHATBRIDGE_TEST_POSTGRES_URL`, names the
//! server; the phases run the same code on either).

use super::*;

pub(crate) enum Backend {
    Sqlite {
        dir: PathBuf,
    },
    Postgres {
        /// A database on the server to create the phases' databases from.
        admin_url: String,
        /// The databases made so far, dropped on drop.
        made: RefCell<Vec<String>>,
    },
}

/// The PostgreSQL server the benchmark uses, if one is named.
pub(crate) fn postgres_url() -> Option<String> {
    ["BENCH_POSTGRES_URL", "CHATBRIDGE_TEST_POSTGRES_URL"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// `url` with its database (the path) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let authority = url.find("://").map(|i| i + 3).unwrap_or(0);
    let path = url[authority..]
        .find('/')
        .map(|i| authority + i)
        .unwrap_or(url.len());
    let query = url[path..].find('?').map(|i| path + i).unwrap_or(url.len());
    format!("{}/{database}{}", &url[..path], &url[query..])
}

/// Runs `work` on a fresh connection to `url`, on a runtime of its own.
pub(crate) fn pg<T>(
    url: &str,
    work: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connecting to PostgreSQL: {e}"))?;
        let driver = tokio::spawn(conn);
        let out = work(&client).await.map_err(|e| {
            let detail = e.as_db_error().map(|d| d.message().to_owned());
            format!("PostgreSQL: {e} {}", detail.unwrap_or_default())
        });
        drop(client);
        let _ = driver.await;
        out
    })
}

impl Backend {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "SQLite",
            Self::Postgres { .. } => "PostgreSQL",
        }
    }

    /// A new, empty store called `name` (its schema is made by the service
    /// or by `open`); returns its `storage.url`.
    pub(crate) fn fresh(&self, name: &str) -> Result<String, String> {
        match self {
            Self::Sqlite { dir } => {
                let path = dir.join(format!("{name}.db"));
                let _ = std::fs::remove_file(&path);
                Ok(format!("sqlite://{}", path.display()))
            }
            Self::Postgres { admin_url, made } => {
                let database =
                    format!("chatbridge_bench_{}_{name}", std::process::id()).replace('-', "_");
                pg(admin_url, async |c| {
                    c.batch_execute(&format!("DROP DATABASE IF EXISTS {database}"))
                        .await?;
                    c.batch_execute(&format!("CREATE DATABASE {database}"))
                        .await
                })?;
                made.borrow_mut().push(database.clone());
                Ok(with_database(admin_url, &database))
            }
        }
    }

    /// The store at `url`, opened in this process (its schema made if new).
    pub(crate) fn open(&self, url: &str) -> Result<std::sync::Arc<dyn Store>, String> {
        let settings = chatbridge::settings::StorageSettings {
            url: url.to_owned(),
            retention_days: 30,
            pool_size: 4,
            connect_timeout_secs: 10,
            ..Default::default()
        };
        chatbridge::store::open(&settings).map_err(|e| e.to_string())
    }

    /// Deliveries per state, attempts, and deliveries delivered twice.
    pub(crate) fn counts(&self, url: &str) -> Result<DbCounts, String> {
        const STATES: &str = "SELECT state, COUNT(*) FROM deliveries GROUP BY state";
        const ATTEMPTS: &str = "SELECT COUNT(*) FROM attempts";
        const DOUBLED: &str = "SELECT COUNT(*) FROM (SELECT delivery_id FROM attempts
             WHERE outcome = 'delivered' GROUP BY delivery_id HAVING COUNT(*) > 1) AS d";
        match self {
            Self::Sqlite { .. } => {
                let path = chatbridge::store::sqlite_path(url).ok_or("not a SQLite URL")?;
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .map_err(|e| e.to_string())?;
                let e = |e: rusqlite::Error| e.to_string();
                let mut stmt = conn.prepare(STATES).map_err(e)?;
                let states = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                    .map_err(e)?
                    .collect::<Result<_, _>>()
                    .map_err(e)?;
                Ok(DbCounts {
                    states,
                    attempts: conn.query_row(ATTEMPTS, [], |r| r.get(0)).map_err(e)?,
                    doubled: conn.query_row(DOUBLED, [], |r| r.get(0)).map_err(e)?,
                })
            }
            Self::Postgres { .. } => pg(url, async |c| {
                let states = c
                    .query(STATES, &[])
                    .await?
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                    .collect();
                Ok(DbCounts {
                    states,
                    attempts: c.query_one(ATTEMPTS, &[]).await?.get(0),
                    doubled: c.query_one(DOUBLED, &[]).await?.get(0),
                })
            }),
        }
    }

    /// Bulk-inserts `n` queued deliveries (and their events) into the new
    /// store `url`: 50 businesses, 1000 chats each, due over the past hour.
    pub(crate) fn seed(
        &self,
        url: &str,
        n: usize,
        sample_body: &str,
        text: &str,
    ) -> Result<Duration, String> {
        match self {
            Self::Sqlite { .. } => {
                let path = chatbridge::store::sqlite_path(url).ok_or("not a SQLite URL")?;
                seed_sqlite(path, n, sample_body, text)
            }
            Self::Postgres { .. } => {
                let t0 = Instant::now();
                // The service's own code creates the schema.
                drop(self.open(url)?);
                let start = now_ms() - 3_600_000;
                let (n, sample_body, text) = (n as i64, sample_body.to_owned(), text.to_owned());
                pg(url, async |c| {
                    // One statement each, rows made by the server: the same
                    // ids, chats and texts as the SQLite seed.
                    c.batch_execute("SET synchronous_commit = off").await?;
                    c.execute(
                        "INSERT INTO events (id, source, external_id, event_type, payload, received_at)
                         SELECT i + 1, 'oms', 'seed-' || lpad(i::text, 9, '0'), 'order.shipped',
                                replace(replace($1, 'evt-1001', 'seed-' || lpad(i::text, 9, '0')),
                                        '51234567', (90000000 + i)::text),
                                $2::bigint + i * 3000000 / $3::bigint
                         FROM generate_series(0::bigint, $3::bigint - 1) AS i",
                        &[&sample_body, &start, &n],
                    )
                    .await?;
                    c.execute(
                        "INSERT INTO deliveries (id, event_id, route, template, business_id, chat_id,
                             conversation, text, state, attempts, created_at, queued_at,
                             next_attempt_at, updated_at)
                         SELECT i + 1, i + 1, 'order-shipped', 'order_shipped', $1::bigint + i % $2::bigint,
                                chat, 'chat:' || chat,
                                replace($4, '51234567', (90000000 + i)::text), 'queued', 0,
                                t, t, t, t
                         FROM generate_series(0::bigint, $5::bigint - 1) AS i,
                              LATERAL (SELECT 100000 + (i / $2::bigint) % $3::bigint AS chat,
                                              $6::bigint + i * 3000000 / $5::bigint AS t) AS v",
                        &[
                            &FIRST_BUSINESS,
                            &BUSINESSES,
                            &CHATS_PER_BUSINESS,
                            &text,
                            &n,
                            &start,
                        ],
                    )
                    .await?;
                    c.batch_execute(
                        "SELECT setval('events_id_seq', (SELECT MAX(id) FROM events));
                         SELECT setval('deliveries_id_seq', (SELECT MAX(id) FROM deliveries));
                         ANALYZE",
                    )
                    .await
                })?;
                Ok(t0.elapsed())
            }
        }
    }

    /// The server's settings that move the figures, for the report.
    pub(crate) fn describe(&self) -> Result<String, String> {
        match self {
            Self::Sqlite { .. } => Ok("WAL, synchronous = FULL (the service's own)".into()),
            Self::Postgres { admin_url, .. } => pg(admin_url, async |c| {
                let mut parts = Vec::new();
                for name in [
                    "server_version",
                    "shared_buffers",
                    "synchronous_commit",
                    "fsync",
                    "wal_level",
                    "max_connections",
                ] {
                    let v: String = c.query_one(&format!("SHOW {name}"), &[]).await?.get(0);
                    parts.push(format!("{name} {v}"));
                }
                Ok(parts.join(", "))
            }),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Self::Postgres { admin_url, made } = self {
            for database in made.borrow().iter() {
                let sql = format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)");
                if let Err(e) = pg(admin_url, async |c| c.batch_execute(&sql).await) {
                    log(format!("could not drop database {database}: {e}"));
                }
            }
        }
    }
}
