//! `spawn_app()`: the real service on a random loopback port, with a fresh
//! SQLite file (or, with `Backend::Postgres`, a fresh PostgreSQL database
//! on `CHATBRIDGE_TEST_POSTGRES_URL`) and the fake Market on another port.
//! Tests talk HTTP to both. (process.rs starts the real binary instead.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatbridge::app::{Application, BuildOptions};
use chatbridge::clock::{ManualClock, SharedClock, SystemClock};
use chatbridge::market::fake::{FakeConfig, FakeMarket};
use chatbridge::pipeline::Pipeline;
use chatbridge::settings::Settings;
use serde_json::Value;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const API_KEY: &str = "test-api-key";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What a test may change before the app starts.
pub struct TestOptions {
    pub fake: FakeConfig,
    /// `None`: the system clock.
    pub clock: Option<Arc<ManualClock>>,
    /// Files to write over the copied `config/` and `templates/` (paths
    /// relative to the temp root, e.g. "templates/x.hbs", "config/routes.toml").
    pub files: Vec<(String, String)>,
    pub tweak: Option<Box<dyn Fn(&mut Settings) + Send + Sync>>,
    /// Which store the app runs on.
    pub backend: Backend,
    /// Run as another instance of an app already running: on its
    /// PostgreSQL database and against its fake Market (`TestApp::another`).
    pub join: Option<(Arc<TestDatabase>, FakeMarket)>,
}

/// The store backend of a test app. The store-touching suites run once per
/// backend (tests/api/postgres.rs runs them again with `Postgres`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Sqlite,
    // Used by tests/api/postgres.rs, compiled only with the URL set.
    #[cfg_attr(not(postgres_tests), allow(dead_code))]
    Postgres,
}

/// The server the PostgreSQL tests use (any database on it; each test
/// creates and drops its own).
pub const POSTGRES_URL_VAR: &str = "CHATBRIDGE_TEST_POSTGRES_URL";

/// A database made for one test, dropped (connections and all) when the
/// last handle goes.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Arc<TestDatabase> {
        let admin_url = std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| {
            panic!("{POSTGRES_URL_VAR} is not set: point it at a PostgreSQL server, e.g. postgres://postgres@127.0.0.1:5432/postgres")
        });
        let name = format!(
            "chatbridge_test_{}",
            rand_id()
                .to_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_URL_VAR}: {e}"));
        let driver = actix_rt::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        // Tests do not survive a server crash; skipping the flush per
        // commit keeps the 5000-event bursts quick on a shared disk.
        client
            .batch_execute(&format!(
                "ALTER DATABASE {name} SET synchronous_commit = off"
            ))
            .await
            .unwrap();
        drop(client);
        let _ = driver.await;
        let (head, query) = match admin_url.split_once('?') {
            Some((h, q)) => (h, format!("?{q}")),
            None => (admin_url.as_str(), String::new()),
        };
        let authority = head.find("://").map(|i| i + 3).unwrap_or(0);
        let base = match head[authority..].find('/') {
            Some(i) => &head[..authority + i],
            None => head,
        };
        let url = format!("{base}/{name}{query}");
        Arc::new(TestDatabase {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    let driver = tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    drop(client);
                    let _ = driver.await;
                }
            });
        })
        .join();
    }
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            fake: FakeConfig {
                api_keys: vec![API_KEY.into()],
                ..FakeConfig::default()
            },
            clock: None,
            files: Vec::new(),
            tweak: None,
            backend: Backend::default(),
            join: None,
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub market: FakeMarket,
    pub clock: SharedClock,
    pub manual_clock: Option<Arc<ManualClock>>,
    pub root: tempfile::TempDir,
    pub client: awc::Client,
    handle: actix_web::dev::ServerHandle,
    server: actix_rt::task::JoinHandle<std::io::Result<()>>,
    loader: chatbridge::reload::SettingsLoader,
    /// The PostgreSQL database, when the app runs on one.
    pub database: Option<Arc<TestDatabase>>,
    /// `false`: the app accepts work but never sends
    /// (`another_without_dispatcher`).
    dispatching: bool,
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestOptions::default()).await
}

pub async fn spawn_app_with(options: TestOptions) -> TestApp {
    spawn(options, true).await
}

async fn spawn(options: TestOptions, dispatching: bool) -> TestApp {
    let root = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("config"), &root.path().join("config"));
    copy_dir(&repo().join("templates"), &root.path().join("templates"));
    for (path, contents) in &options.files {
        let target = root.path().join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, contents).unwrap();
    }
    let clock: SharedClock = match &options.clock {
        Some(c) => c.clone(),
        None => Arc::new(SystemClock),
    };
    let (market, database) = match (options.join, options.backend) {
        (Some((database, market)), _) => (market, Some(database)),
        (None, backend) => (
            FakeMarket::start("127.0.0.1:0", options.fake, clock.clone()).unwrap(),
            match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(TestDatabase::create().await),
            },
        ),
    };
    let storage_url = match &database {
        Some(db) => db.url.clone(),
        None => format!("sqlite://{}", root.path().join("chatbridge.db").display()),
    };
    // What the test sets in code, applied again on every reload.
    let (dir, market_url, tweak) = (root.path().to_path_buf(), market.base_url(), options.tweak);
    let loader: chatbridge::reload::SettingsLoader = Arc::new(move || {
        let mut settings = Settings::load(&dir.join("config")).map_err(|e| vec![e.to_string()])?;
        settings.storage.url = storage_url.clone();
        // Many tests run at once against a server allowing 100 connections.
        settings.storage.pool_size = 4;
        // PostgreSQL's /metrics shows the queue's gauges as last read in
        // the background: read often, so a test waits little for them.
        settings.storage.gauge_refresh_ms = 50;
        settings.templates.dir = dir.join("templates");
        settings.market.base_url = market_url.clone();
        settings.market.api_key = Some(API_KEY.to_owned().into());
        settings.admin.token = Some(ADMIN_TOKEN.to_owned().into());
        settings.server.listen = "127.0.0.1:0".into();
        settings.server.workers = 2;
        // Tests reload on purpose, through the admin API.
        settings.server.watch_config = false;
        if let Some(tweak) = &tweak {
            tweak(&mut settings);
        }
        Ok(settings)
    });
    start(
        root,
        market,
        clock,
        options.clock,
        loader,
        database,
        dispatching,
    )
    .await
}

async fn start(
    root: tempfile::TempDir,
    market: FakeMarket,
    clock: SharedClock,
    manual_clock: Option<Arc<ManualClock>>,
    loader: chatbridge::reload::SettingsLoader,
    database: Option<Arc<TestDatabase>>,
    dispatching: bool,
) -> TestApp {
    let settings = loader().unwrap_or_else(|p| panic!("{}", p.join("\n")));
    let pipeline = Pipeline::from_settings(settings).unwrap_or_else(|p| panic!("{}", p.join("\n")));
    let app = Application::build(
        pipeline,
        BuildOptions {
            clock: clock.clone(),
            handle_signals: false,
            loader: Some(loader.clone()),
        },
    )
    .unwrap();
    if !dispatching {
        app.stop_dispatcher();
    }
    let base = format!("http://{}", app.addr());
    let handle = app.handle();
    let server = actix_rt::spawn(app.run_until_stopped());
    TestApp {
        base,
        market,
        clock,
        manual_clock,
        root,
        client: awc::Client::builder()
            .timeout(Duration::from_secs(30))
            .finish(),
        handle,
        server,
        loader,
        database,
        dispatching,
    }
}

impl TestApp {
    /// Stops the service gracefully and starts it again on the same
    /// database, configuration and fake Market.
    pub async fn restart(self) -> TestApp {
        self.handle.stop(true).await;
        let _ = self.server.await;
        start(
            self.root,
            self.market,
            self.clock,
            self.manual_clock,
            self.loader,
            self.database,
            self.dispatching,
        )
        .await
    }

    /// Another instance on this app's PostgreSQL database and fake Market
    /// (its own settings, from `options`; `options.fake` is not used).
    // Used by tests/api/several_instances.rs, compiled only with the URL set.
    #[cfg_attr(not(postgres_tests), allow(dead_code))]
    pub async fn another(&self, options: TestOptions) -> TestApp {
        self.join(options, true).await
    }

    /// `another` instance that accepts work (webhooks, the admin API) but
    /// never sends: its dispatcher is stopped before its first round.
    // Used by tests/api/wake_ups.rs, compiled only with the URL set.
    #[cfg_attr(not(postgres_tests), allow(dead_code))]
    pub async fn another_without_dispatcher(&self, options: TestOptions) -> TestApp {
        self.join(options, false).await
    }

    #[cfg_attr(not(postgres_tests), allow(dead_code))]
    async fn join(&self, options: TestOptions, dispatching: bool) -> TestApp {
        let database = self
            .database
            .clone()
            .expect("another instance needs an app on PostgreSQL");
        spawn(
            TestOptions {
                join: Some((database, self.market.clone())),
                backend: Backend::Postgres,
                ..options
            },
            dispatching,
        )
        .await
    }

    pub async fn stop(self) {
        self.handle.stop(true).await;
        let _ = self.server.await;
        self.market.stop().await;
    }

    /// Posts an event signed with the shipped `oms` secret.
    pub async fn post_event(&self, source: &str, body: &Value) -> (u16, Value) {
        let text = body.to_string();
        let id = format!("msg_{}", rand_id());
        let ts = self.clock.now_ms() / 1000;
        let sig = chatbridge::ingest::signature::sign(SECRET, &id, ts, text.as_bytes()).unwrap();
        self.post_raw(
            &format!("/hooks/{source}"),
            &[
                ("content-type", "application/json".into()),
                ("webhook-id", id),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", sig),
            ],
            text.into_bytes(),
        )
        .await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = self.client.post(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.insert_header((*k, v.as_str()));
        }
        let mut resp = req.send_body(body).await.expect("request failed");
        read_json(&mut resp).await
    }

    /// `GET` without credentials.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let mut resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request failed");
        read_json(&mut resp).await
    }

    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        let mut resp = self
            .client
            .get(format!("{}{path}", self.base))
            .insert_header(("authorization", format!("Bearer {ADMIN_TOKEN}")))
            .send()
            .await
            .expect("request failed");
        read_json(&mut resp).await
    }

    pub async fn admin_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut resp = self
            .client
            .post(format!("{}{path}", self.base))
            .insert_header(("authorization", format!("Bearer {ADMIN_TOKEN}")))
            .send_json(body)
            .await
            .expect("request failed");
        read_json(&mut resp).await
    }

    /// The delivery with its attempts, from the admin API.
    pub async fn delivery(&self, id: i64) -> Value {
        let (status, body) = self.admin_get(&format!("/admin/deliveries/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits (real time, bounded) until the delivery reaches `state`.
    pub async fn wait_for_state(&self, id: i64, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let body = self.delivery(id).await;
            if body["delivery"]["state"] == state {
                return body;
            }
            if Instant::now() > deadline {
                panic!("delivery {id} never reached {state}: {body:#}");
            }
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (real time, bounded) until the fake Market has `n` delivered messages.
    pub async fn wait_for_delivered(
        &self,
        n: usize,
    ) -> Vec<chatbridge::market::fake::ReceivedRequest> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.market.delivered();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Moves the manual clock forward (panics with the system clock).
    pub fn advance(&self, by: Duration) {
        self.manual_clock
            .as_ref()
            .expect("spawn_app_with a manual clock")
            .advance(by);
    }
}

pub fn rand_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A sample event shipped in `examples/events/oms/`.
pub fn sample(name: &str) -> Value {
    let text =
        std::fs::read_to_string(repo().join(format!("examples/events/oms/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `config/routes.toml` as shipped, with `extra` routes appended, for
/// `TestOptions::files`.
pub fn shipped_routes_plus(extra: &str) -> (String, String) {
    let shipped = std::fs::read_to_string(repo().join("config/routes.toml")).unwrap();
    ("config/routes.toml".into(), format!("{shipped}\n{extra}\n"))
}

/// `config/chatbridge.toml` as shipped, with `extra` appended.
pub fn shipped_settings_plus(extra: &str) -> (String, String) {
    let shipped = std::fs::read_to_string(repo().join("config/chatbridge.toml")).unwrap();
    (
        "config/chatbridge.toml".into(),
        format!("{shipped}\n{extra}\n"),
    )
}

/// Standard Webhooks headers signing `body` with the shipped secret at
/// Unix time `ts` (seconds), plus `Content-Type: application/json`.
pub fn signed_headers(body: &[u8], ts: i64) -> Vec<(&'static str, String)> {
    let id = format!("msg_{}", rand_id());
    let sig = chatbridge::ingest::signature::sign(SECRET, &id, ts, body).unwrap();
    vec![
        ("content-type", "application/json".into()),
        ("webhook-id", id),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sig),
    ]
}

impl TestApp {
    /// Waits (real time, bounded) until the delivery's admin view
    /// (`{"delivery", "attempts", "event"}`) satisfies `done`.
    pub async fn wait_for_delivery(
        &self,
        id: i64,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let body = self.delivery(id).await;
            if done(&body) {
                return body;
            }
            if Instant::now() > deadline {
                panic!("delivery {id} never got {what}: {body:#}");
            }
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every stored delivery (up to 1000), from `GET /admin/deliveries`.
    pub async fn all_deliveries(&self) -> Vec<Value> {
        let (status, body) = self.admin_get("/admin/deliveries?limit=1000").await;
        assert_eq!(status, 200, "{body}");
        body["deliveries"].as_array().cloned().unwrap_or_default()
    }
}

/// A route taking `custom.text` events and sending their `text` as is.
pub fn custom_text_files() -> Vec<(String, String)> {
    vec![
        shipped_routes_plus(
            r#"
[[routes]]
name = "custom-text"
source = "oms"
event = "custom.text"
template = "custom_text"
business_id = "{{businessId}}"
chat_id = "{{chatId}}"
"#,
        ),
        ("templates/custom_text.hbs".into(), "{{text}}".into()),
    ]
}

/// A shipped sample with another event id (and chat).
pub fn sample_as(name: &str, id: &str, chat: Option<i64>) -> Value {
    let mut event = sample(name);
    event["id"] = serde_json::json!(id);
    if let Some(chat) = chat {
        event["chatId"] = serde_json::json!(chat);
    }
    event
}

/// The service's clock in Unix seconds, as a webhook timestamp.
pub fn now_secs(app: &TestApp) -> i64 {
    app.clock.now_ms() / 1000
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The status and the JSON body (`null` when it is not JSON).
async fn read_json<S>(resp: &mut awc::ClientResponse<S>) -> (u16, Value)
where
    S: futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
{
    let status = resp.status().as_u16();
    let bytes = resp.body().limit(16 << 20).await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A child process a test started: killed and reaped on drop, so a failed
/// assertion never leaves a `chatbridge serve` running. When the test is
/// failing, the tail of the child's log (if it has one) is printed.
pub struct ChildGuard {
    child: Option<std::process::Child>,
    log: Option<PathBuf>,
}

impl ChildGuard {
    pub fn new(child: std::process::Child, log: Option<PathBuf>) -> Self {
        Self {
            child: Some(child),
            log,
        }
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Its exit status, if it has exited (then it is no longer owned).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL and reap, now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if let (true, Some(log)) = (std::thread::panicking(), &self.log) {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- {} (tail) ---\n{}",
                log.display(),
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
    }
}

/// The business that `caught_up` sends its marker messages to; tests leave
/// it alone, and count the Market's messages with `buyer_requests`.
pub const MARKER_BUSINESS: i64 = 990_001;

impl TestApp {
    /// The positive signal a "nothing happened" check waits for: the
    /// dispatcher has run whole rounds on the clock as it is now, and every
    /// send those rounds started has reached the Market. It posts a marker
    /// event (`event(n)`, for `MARKER_BUSINESS`), waits until the Market has
    /// it and nothing is `sending`, twice: the round that takes the first
    /// marker may have read the clock before the caller moved it; the one
    /// that takes the second started after that round ended.
    pub async fn caught_up_with(&self, event: impl Fn(String) -> Value) {
        for _ in 0..2 {
            let id = format!("marker-{}", rand_id());
            let body = event(id.clone());
            let chat = body["chatId"].as_i64().expect("a marker names its chat");
            let (status, answer) = self.post_event("oms", &body).await;
            assert_eq!(status, 202, "the marker event was refused: {answer}");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let arrived = self
                    .market
                    .requests()
                    .iter()
                    .any(|r| r.business_id == MARKER_BUSINESS && r.chat_id == chat);
                if arrived && self.nothing_sending().await {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the dispatcher never sent the marker {id}"
                );
                actix_rt::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// `caught_up_with` an `order.shipped` marker (the shipped route).
    pub async fn caught_up(&self) {
        self.caught_up_with(|id| {
            let mut event = sample("order_shipped");
            event["id"] = serde_json::json!(id);
            event["businessId"] = serde_json::json!(MARKER_BUSINESS);
            event["chatId"] = serde_json::json!(marker_chat());
            event
        })
        .await
    }

    async fn nothing_sending(&self) -> bool {
        let (status, body) = self
            .admin_get("/admin/deliveries?state=sending&limit=1")
            .await;
        assert_eq!(status, 200, "{body}");
        body["deliveries"].as_array().is_some_and(Vec::is_empty)
    }

    /// The Market's requests without `caught_up`'s markers.
    pub fn buyer_requests(&self) -> Vec<chatbridge::market::fake::ReceivedRequest> {
        let mut all = self.market.requests();
        all.retain(|r| r.business_id != MARKER_BUSINESS);
        all
    }

    /// The Market's delivered messages without `caught_up`'s markers.
    pub fn buyer_messages(&self) -> Vec<chatbridge::market::fake::ReceivedRequest> {
        let mut all = self.market.delivered();
        all.retain(|r| r.business_id != MARKER_BUSINESS);
        all
    }
}

/// A fresh chat id for a marker, so each marker is told apart.
pub fn marker_chat() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static NEXT: AtomicI64 = AtomicI64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl TestApp {
    /// Posts a Market notification to `/hooks/market/notification`.
    pub async fn notify(&self, body: &Value) -> (u16, Value) {
        self.notify_raw(body.to_string().into_bytes(), &[]).await
    }

    pub async fn notify_raw(&self, body: Vec<u8>, extra: &[(&str, String)]) -> (u16, Value) {
        let mut headers = vec![("content-type", "application/json".to_owned())];
        headers.extend(extra.iter().cloned());
        self.post_raw("/hooks/market/notification", &headers, body)
            .await
    }

    /// The market source's deliveries, from the admin API.
    pub async fn market_deliveries(&self) -> Vec<Value> {
        let mut all = self.all_deliveries().await;
        all.retain(|d| d["source"] == "market");
        all
    }

    /// A connection of the test's own to the app's database, whichever
    /// backend it is, to do what chatbridge never would: hold its locks,
    /// break a table, count rows.
    pub async fn raw_db(&self) -> RawDb {
        match &self.database {
            Some(db) => {
                let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
                    .await
                    .expect("connect to the test database");
                RawDb::Postgres {
                    client,
                    _driver: actix_rt::spawn(connection),
                }
            }
            None => RawDb::Sqlite(
                rusqlite::Connection::open(self.root.path().join("chatbridge.db")).unwrap(),
            ),
        }
    }
}

/// See [`TestApp::raw_db`]; dropping it closes the connection (and rolls
/// back what it left open).
pub enum RawDb {
    Sqlite(rusqlite::Connection),
    Postgres {
        client: tokio_postgres::Client,
        /// Runs the connection; it ends when the client goes.
        _driver: actix_rt::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    },
}

impl RawDb {
    /// Runs `sqlite` or `postgres` (statements separated by `;`), for the
    /// backend it is connected to.
    pub async fn batch(&self, sqlite: &str, postgres: &str) {
        match self {
            RawDb::Sqlite(c) => c.execute_batch(sqlite).unwrap(),
            RawDb::Postgres { client: c, .. } => c.batch_execute(postgres).await.unwrap(),
        }
    }

    /// The one number `sql` (valid on both backends) selects.
    pub async fn count(&self, sql: &str) -> i64 {
        match self {
            RawDb::Sqlite(c) => c.query_row(sql, [], |r| r.get(0)).unwrap(),
            RawDb::Postgres { client: c, .. } => c.query_one(sql, &[]).await.unwrap().get(0),
        }
    }
}

/// The answer to a claimed send at `at`, as the dispatcher records it
/// (200 if delivered, else 500; counted by the Market's quota).
#[cfg(postgres_tests)]
pub fn answer(
    claimed: &chatbridge::store::Claimed,
    at: i64,
    verdict: chatbridge::store::Verdict,
) -> chatbridge::store::Attempt {
    chatbridge::store::Attempt {
        delivery_id: claimed.id,
        claim_token: claimed.claim_token,
        business_id: claimed.business_id,
        method: chatbridge::domain::MarketMethod::SendMessage,
        started_at: at - 10,
        finished_at: at,
        latency_ms: 10,
        http_status: Some(if verdict == chatbridge::store::Verdict::Delivered {
            200
        } else {
            500
        }),
        api_errors: Vec::new(),
        error: None,
        counts_for_quota: true,
        window_used_up_until: None,
        verdict,
    }
}

/// An event of source `oms` with one delivery of `business` to `chat`,
/// saying `text`: what the store-level tests on PostgreSQL insert.
#[cfg(postgres_tests)]
pub fn chat_event(id: &str, business: i64, chat: i64, text: &str) -> chatbridge::store::NewEvent {
    use chatbridge::domain::{BusinessId, ChatId, Target};
    use chatbridge::store::{NewDelivery, NewEvent, RenderedMessage};
    NewEvent {
        source: "oms".into(),
        external_id: id.into(),
        event_type: "test".into(),
        payload: "{}".into(),
        received_at: 1_000,
        deliveries: vec![NewDelivery {
            route: "test".into(),
            template: "test".into(),
            rendered: Ok(RenderedMessage {
                business_id: BusinessId(business),
                target: Target::Chat(ChatId(chat)),
                text: text.into(),
            }),
        }],
        business_id: None,
        ordering: None,
    }
}
