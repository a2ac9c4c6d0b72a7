//! `chatbridge serve` as a child process, as an operator runs it: a temp
//! root with the shipped `config/` and `templates/` ([`ServeRoot`]), and
//! each process started from it ([`ServeProcess`]) with its settings in
//! `CHATBRIDGE__*` variables, its output in a log file, and a
//! [`ChildGuard`] that kills it when the test ends however it ends.
//! serve_binary.rs, crash.rs, outage.rs and several_processes.rs start
//! theirs here
//! (a module of its own, not in helpers.rs, which tests/browser shares).

use std::cell::Cell;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chatbridge::market::fake::FakeMarket;
use serde_json::Value;

use crate::helpers::{copy_dir, free_port, repo, signed_headers, ChildGuard, ADMIN_TOKEN, API_KEY};

pub const BIN: &str = env!("CARGO_BIN_EXE_chatbridge");

/// A temp root with the shipped configuration; every process started from
/// it uses the same database (by default the SQLite file `db.sqlite`).
pub struct ServeRoot {
    pub dir: tempfile::TempDir,
    market_url: String,
    storage_url: String,
    starts: Cell<u32>,
}

impl ServeRoot {
    pub fn new(market: &FakeMarket) -> Self {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&repo().join("config"), &dir.path().join("config"));
        copy_dir(&repo().join("templates"), &dir.path().join("templates"));
        let storage_url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
        Self {
            dir,
            market_url: market.base_url(),
            storage_url,
            starts: Cell::new(0),
        }
    }

    /// Every process started from this root uses `url` as its store.
    // Used by the PostgreSQL-only tests, compiled only with the URL set.
    #[cfg_attr(not(postgres_tests), allow(dead_code))]
    pub fn with_storage(mut self, url: &str) -> Self {
        url.clone_into(&mut self.storage_url);
        self
    }

    /// The SQLite file, when the root uses the default store.
    pub fn db(&self) -> PathBuf {
        self.dir.path().join("db.sqlite")
    }

    /// Writes `contents` to `relative` (e.g. "config/routes.toml").
    pub fn write(&self, relative: &str, contents: &str) {
        std::fs::write(self.dir.path().join(relative), contents).unwrap();
    }

    /// Starts `chatbridge serve` (stdout and stderr to `serve-N.log`) with
    /// the root's store, the fake Market, one worker and no inherited
    /// `CHATBRIDGE__*`, `RUST_LOG` or `NO_COLOR`; `env` is set last.
    pub fn spawn(&self, env: &[(&str, &str)]) -> ServeProcess {
        let n = self.starts.get() + 1;
        self.starts.set(n);
        let port = free_port();
        let log = self.dir.path().join(format!("serve-{n}.log"));
        let out = File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.current_dir(self.dir.path())
            .args(["serve", "--config"])
            .arg(self.dir.path().join("config"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, _) in std::env::vars() {
            if k.starts_with("CHATBRIDGE__") || k == "NO_COLOR" || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("CHATBRIDGE__STORAGE__URL", &self.storage_url)
            .env("CHATBRIDGE__MARKET__BASE_URL", &self.market_url)
            .env("CHATBRIDGE__MARKET__API_KEY", API_KEY)
            .env("CHATBRIDGE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("CHATBRIDGE__SERVER__WORKERS", "1")
            .env("CHATBRIDGE__SERVER__WATCH_CONFIG", "false")
            .env(
                "CHATBRIDGE__TEMPLATES__DIR",
                self.dir.path().join("templates"),
            )
            .env("CHATBRIDGE__ADMIN__TOKEN", ADMIN_TOKEN);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        ServeProcess {
            child: ChildGuard::new(child, Some(log.clone())),
            base: format!("http://127.0.0.1:{port}"),
            log,
            client: awc::Client::builder()
                .timeout(Duration::from_secs(30))
                .finish(),
        }
    }

    /// `spawn`, then waits (bounded) until `/readyz` answers 200.
    pub async fn start(&self, env: &[(&str, &str)]) -> ServeProcess {
        let mut serve = self.spawn(env);
        serve.wait_ready().await;
        serve
    }
}

/// One `chatbridge serve`; killed (and its log tail printed when the test
/// is failing) on drop.
pub struct ServeProcess {
    child: ChildGuard,
    pub base: String,
    pub log: PathBuf,
    pub client: awc::Client,
}

impl ServeProcess {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait()
    }

    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "serve exited before it was ready ({status}):\n{}",
                    self.log_text()
                );
            }
            if let Ok(resp) = self
                .client
                .get(format!("{}/readyz", self.base))
                .send()
                .await
            {
                if resp.status().as_u16() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not ready within 30 s:\n{}",
                self.log_text()
            );
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) for the process to exit; `None` when it did not.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.try_wait().is_none() && self.child.id().is_some()
    }

    /// SIGKILL and reap: nothing runs on the way out.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log has a line containing every part.
    pub async fn wait_for_line(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self
                .log_text()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}:\n{}",
                self.log_text()
            );
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The status of a `POST`; panics on a transport error.
    pub async fn post(&self, path: &str, headers: &[(&str, String)], body: &[u8]) -> u16 {
        let mut req = self.client.post(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.insert_header((*k, v.as_str()));
        }
        let mut resp = req.send_body(body.to_vec()).await.expect("post");
        let _ = resp.body().await;
        resp.status().as_u16()
    }

    pub async fn admin_get(&self, path: &str) -> Value {
        let mut resp = self
            .client
            .get(format!("{}{path}", self.base))
            .insert_header(("authorization", format!("Bearer {ADMIN_TOKEN}")))
            .send()
            .await
            .expect("admin request");
        assert_eq!(resp.status().as_u16(), 200, "GET {path}");
        let bytes = resp.body().limit(16 << 20).await.expect("admin body");
        serde_json::from_slice(&bytes).expect("admin JSON")
    }

    /// `(queued, sending, held, dead, failed)` summed over businesses,
    /// from `GET /admin/queue`.
    pub async fn queue(&self) -> [i64; 5] {
        let body = self.admin_get("/admin/queue").await;
        let mut out = [0; 5];
        for b in body["businesses"].as_array().expect("businesses") {
            for (i, k) in ["queued", "sending", "held", "dead", "failed"]
                .iter()
                .enumerate()
            {
                out[i] += b[k].as_i64().unwrap_or(0);
            }
        }
        out
    }

    /// Waits (bounded) until nothing is queued, sending or held.
    pub async fn wait_settled(&self, within: Duration) -> [i64; 5] {
        let deadline = Instant::now() + within;
        loop {
            let q = self.queue().await;
            if q[0] + q[1] + q[2] == 0 || Instant::now() > deadline {
                return q;
            }
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Posts `event` to `{base}/hooks/oms`, signed with the shipped secret at
/// the system time; `Err` for a transport error (not accepted).
pub async fn post_signed(client: &awc::Client, base: &str, event: &Value) -> Result<u16, String> {
    let body = event.to_string().into_bytes();
    let mut req = client.post(format!("{base}/hooks/oms"));
    for (k, v) in signed_headers(&body, chrono::Utc::now().timestamp()) {
        req = req.insert_header((k, v));
    }
    let mut resp = req.send_body(body).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.body().await;
    Ok(status)
}
