//! A database outage is not a crash (issue 13): `chatbridge serve` on a
//! database that goes away under load and comes back. While it is away,
//! webhooks are refused 503 `store_unavailable` (Market notifications 500),
//! `/readyz` is 503 naming the store, `chatbridge_store_up` is 0 and the
//! process lives on; once it is back, everything resumes without a restart:
//! every event answered 2xx is delivered exactly once, nothing stays
//! `sending`, and the log has one outage line and one recovery line.
//!
//! PostgreSQL: a private server (`initdb` + `pg_ctl` as the `postgres`
//! user, on a free port, in a temp dir) stopped with `-m immediate` and
//! started again; the shared server on `CHATBRIDGE_TEST_POSTGRES_URL` is
//! not touched, but like the other PostgreSQL tests this one is compiled
//! only with that variable set. SQLite: its file on a 2 MB tmpfs that a
//! filler file fills up, then frees; skipped (with the reason printed)
//! where `mount` is refused.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;
use crate::process::{ServeProcess, ServeRoot};
use crate::serve_binary::fake;

#[cfg(not(postgres_tests))]
#[test]
#[ignore = "CHATBRIDGE_TEST_POSTGRES_URL is not set: the PostgreSQL outage test (a private server stopped and started) did not run"]
fn postgres_outage_skipped() {}

fn unix_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// One webhook the poster sent: its event id, the chat it writes to, and
/// the status it got (0: no answer at all).
#[derive(Debug, Clone)]
struct Posted {
    id: String,
    chat: i64,
    status: u16,
}

/// Posts signed `order.shipped` events, each to a chat of its own, one
/// after another until told to stop, and keeps what each got.
struct Poster {
    posted: Rc<RefCell<Vec<Posted>>>,
    running: Rc<Cell<bool>>,
    task: actix_rt::task::JoinHandle<()>,
}

impl Poster {
    fn start(base: &str, first_chat: i64) -> Self {
        let posted = Rc::new(RefCell::new(Vec::new()));
        let running = Rc::new(Cell::new(true));
        let (p, r, base) = (posted.clone(), running.clone(), base.to_owned());
        let task = actix_rt::spawn(async move {
            let client = awc::Client::builder()
                .timeout(Duration::from_secs(30))
                .finish();
            let mut n = 0;
            while r.get() {
                n += 1;
                let chat = first_chat + n;
                let id = format!("outage-{}", rand_id());
                let body = sample_as("order_shipped", &id, Some(chat)).to_string();
                let mut req = client.post(format!("{base}/hooks/oms"));
                for (k, v) in signed_headers(body.as_bytes(), unix_secs()) {
                    req = req.insert_header((k, v));
                }
                let status = match req.send_body(body).await {
                    Ok(resp) => resp.status().as_u16(),
                    Err(_) => 0,
                };
                p.borrow_mut().push(Posted { id, chat, status });
                // A steady stream, not a flood: the point is the outage.
                actix_rt::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Self {
            posted,
            running,
            task,
        }
    }

    fn count(&self, status: u16) -> usize {
        self.posted
            .borrow()
            .iter()
            .filter(|p| p.status == status)
            .count()
    }

    /// Waits (real time, bounded: the poster runs on real time) until
    /// `status` was answered `n` more times than `before`.
    async fn wait_for(
        &self,
        status: u16,
        before: usize,
        n: usize,
        what: &str,
        serve: &ServeProcess,
    ) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count(status) < before + n {
            assert!(
                Instant::now() < deadline,
                "{what}: {} answers {status} in 30 s, wanted {n}; statuses {:?}\n{}",
                self.count(status) - before,
                self.posted
                    .borrow()
                    .iter()
                    .map(|p| p.status)
                    .collect::<Vec<_>>(),
                serve.log_text()
            );
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Vec<Posted> {
        self.running.set(false);
        let _ = self.task.await;
        self.posted.take()
    }
}

/// `GET` (or a `POST` of a body) on the service: status, headers, body.
async fn call(
    base: &str,
    path: &str,
    post: Option<(&[(&str, String)], String)>,
) -> (u16, awc::http::header::HeaderMap, String) {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let url = format!("{base}{path}");
    let mut resp = match post {
        None => client
            .get(url)
            .insert_header(("authorization", format!("Bearer {ADMIN_TOKEN}")))
            .send()
            .await
            .expect("request"),
        Some((headers, body)) => {
            let mut req = client.post(url);
            for (k, v) in headers {
                req = req.insert_header((*k, v.as_str()));
            }
            req.send_body(body).await.expect("request")
        }
    };
    let body = resp.body().limit(16 << 20).await.unwrap_or_default();
    (
        resp.status().as_u16(),
        resp.headers().clone(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// What a user checks while the store is away: a webhook is refused 503
/// `store_unavailable` with `Retry-After`, `/readyz` is 503 and says the
/// store is unavailable, `/metrics` still answers with the store down and
/// the refusals counted, and the process is alive.
async fn check_refusing(serve: &mut ServeProcess) {
    let body = sample_as("order_shipped", &format!("probe-{}", rand_id()), Some(1)).to_string();
    let headers = signed_headers(body.as_bytes(), unix_secs());
    let (status, head, text) = call(&serve.base, "/hooks/oms", Some((&headers, body))).await;
    assert_eq!(status, 503, "a webhook while the store is away: {text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("not stored") || message.contains("nothing was stored"),
        "the message says the event was not stored: {message}"
    );
    assert!(
        head.get("retry-after").is_some(),
        "503 carries Retry-After: {head:?}"
    );

    let (status, _, text) = call(&serve.base, "/readyz", None).await;
    assert_eq!(status, 503, "readyz while the store is away: {text}");
    let ready: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(ready["status"], "unavailable", "{ready}");
    assert!(
        ready["store"]
            .as_str()
            .is_some_and(|s| s.contains("database is unavailable")),
        "readyz names the store and why: {ready}"
    );

    let (status, _, metrics) = call(&serve.base, "/metrics", None).await;
    assert_eq!(status, 200, "/metrics answers during an outage: {metrics}");
    assert!(
        metrics.contains("chatbridge_store_up 0"),
        "store_up is 0:\n{metrics}"
    );
    assert!(
        metrics.contains(r#"outcome="store_unavailable""#),
        "refusals are counted:\n{metrics}"
    );
    assert!(serve.alive(), "the service exited:\n{}", serve.log_text());
}

/// After the outage: each event answered 2xx reached the Market exactly
/// once, a refused one at most once and only if its commit landed after
/// all (the store has it), nothing is left `sending`, and the log has
/// exactly one outage line and one recovery line. Returns the log.
async fn check_recovered(
    serve: &mut ServeProcess,
    market: &chatbridge::market::fake::FakeMarket,
    posted: &[Posted],
) -> String {
    let accepted: Vec<&Posted> = posted.iter().filter(|p| p.status == 202).collect();
    // Real time: the service runs on it. A lost claim answer waits out its
    // lease (8 s here) and the dispatcher's backoff (≤ 5 s); the rest is
    // slack for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(90);
    let sent = |chat: i64| {
        market
            .delivered()
            .iter()
            .filter(|r| r.chat_id == chat)
            .count()
    };
    while accepted.iter().any(|p| sent(p.chat) == 0) {
        assert!(
            Instant::now() < deadline,
            "accepted events not delivered in 90 s: {:?}\n{}",
            accepted
                .iter()
                .filter(|p| sent(p.chat) == 0)
                .map(|p| &p.id)
                .collect::<Vec<_>>(),
            serve.log_text()
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    // Wait for the queue to drain (refused events whose commit landed).
    loop {
        let (status, _, text) = call(
            &serve.base,
            "/admin/deliveries?state=sending&limit=10",
            None,
        )
        .await;
        assert_eq!(status, 200, "{text}");
        let (_, _, queued) =
            call(&serve.base, "/admin/deliveries?state=queued&limit=10", None).await;
        let empty = |t: &str| {
            serde_json::from_str::<Value>(t).unwrap()["deliveries"]
                .as_array()
                .is_some_and(Vec::is_empty)
        };
        if empty(&text) && empty(&queued) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still sending or queued after the outage: {text} {queued}"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    for p in posted {
        let n = sent(p.chat);
        if p.status == 202 {
            assert_eq!(n, 1, "event {} was answered 202 and sent {n} times", p.id);
            continue;
        }
        assert!(
            n <= 1,
            "event {} (answered {}) sent {n} times",
            p.id,
            p.status
        );
        let (status, _, _) = call(
            &serve.base,
            &format!("/admin/events?source=oms&event_id={}", p.id),
            None,
        )
        .await;
        let stored = status == 200;
        assert_eq!(
            n,
            usize::from(stored),
            "event {} answered {}: stored {stored}, sent {n} times",
            p.id,
            p.status
        );
    }

    let (status, _, text) = call(&serve.base, "/readyz", None).await;
    assert_eq!(status, 200, "ready again: {text}");
    assert!(serve.alive(), "the service exited:\n{}", serve.log_text());
    let log = serve.log_text();
    let lines = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(
        lines("the store is unavailable"),
        1,
        "one outage line:\n{log}"
    );
    assert_eq!(
        lines("the store is available again"),
        1,
        "one recovery line:\n{log}"
    );
    assert_eq!(
        lines("ERROR"),
        1,
        "no ERROR line but the outage's (not one per request or round):\n{log}"
    );
    let back = log
        .lines()
        .find(|l| l.contains("the store is available again"))
        .unwrap();
    assert!(
        back.contains("out_for_secs=") && back.contains("refused_webhooks="),
        "the recovery line says how long and how many were refused: {back}"
    );
    log
}

/// A PostgreSQL server of the test's own, run as the `postgres` user
/// (initdb and the server refuse root) in a temp dir that user owns;
/// stopped (immediately) and its files removed on drop, even on failure.
#[cfg_attr(not(postgres_tests), allow(dead_code))] // used by the PostgreSQL outage tests
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

#[cfg_attr(not(postgres_tests), allow(dead_code))] // used by the PostgreSQL outage tests
impl PrivatePostgres {
    fn start() -> Self {
        let out = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config (PostgreSQL's server package) is needed for the outage test");
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let dir = tempfile::Builder::new()
            .prefix("chatbridge-pg-")
            .tempdir()
            .unwrap();
        if as_root() {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(dir.path()));
        }
        let pg = Self {
            dir,
            bin,
            port: free_port(),
        };
        run(pg
            .tool("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(pg.data()));
        pg.start_server();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A PostgreSQL program, as the `postgres` user when we are root.
    fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let status = self
            .tool("pg_ctl")
            .args(["-w", "-t", "30", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &options, "start"])
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl start");
        assert!(
            status.success(),
            "pg_ctl start failed:\n{}",
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// As a crash or a lost server looks to clients: no shutdown checkpoint,
    /// every connection cut.
    fn stop_immediately(&self) -> bool {
        self.tool("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn url(&self, password: &str) -> String {
        format!(
            "postgres://postgres:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop_immediately();
    }
}

#[cfg_attr(not(postgres_tests), allow(dead_code))] // used by the PostgreSQL outage tests
fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

#[cfg_attr(not(postgres_tests), allow(dead_code))] // used by the PostgreSQL outage tests
fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(postgres_tests)]
#[actix_rt::test]
async fn postgres_going_away_under_load_refuses_webhooks_loses_nothing_and_resumes_by_itself() {
    let pg = PrivatePostgres::start();
    let market = fake();
    let root = ServeRoot::new(&market);
    // Market notifications from loopback, to see their answer too.
    let settings = root.dir.path().join("config/chatbridge.toml");
    let text = std::fs::read_to_string(&settings).unwrap();
    let text = text
        .lines()
        .map(|l| match l.starts_with("allow_from") {
            true => r#"allow_from = ["127.0.0.1/32"]"#,
            false => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&settings, text).unwrap();
    // trust auth ignores the password; it is here to show it never leaks.
    let password = format!("pw-{}", rand_id());
    let url = pg.url(&password);
    let mut serve = root
        .start(&[
            ("CHATBRIDGE__STORAGE__URL", &url),
            ("CHATBRIDGE__STORAGE__CONNECT_TIMEOUT_SECS", "2"),
            ("CHATBRIDGE__STORAGE__POOL_SIZE", "4"),
            // A claim whose commit landed as the server died, but whose
            // answer was lost, stays `sending` until its lease ends: keep
            // the lease short so the check below does not wait a minute.
            ("CHATBRIDGE__MARKET__REQUEST_TIMEOUT_SECS", "3"),
            ("CHATBRIDGE__DISPATCH__LEASE_SECS", "8"),
        ])
        .await;

    let poster = Poster::start(&serve.base, 700_000);
    poster
        .wait_for(202, 0, 10, "before the outage", &serve)
        .await;

    assert!(pg.stop_immediately(), "pg_ctl stop -m immediate");
    let refused_before = poster.count(503);
    poster
        .wait_for(503, refused_before, 10, "during the outage", &serve)
        .await;
    check_refusing(&mut serve).await;
    let notification = sample_of("market", "order_in_delivery");
    let headers = vec![("content-type", "application/json".to_owned())];
    let (status, _, text) = call(
        &serve.base,
        "/hooks/market/notification",
        Some((&headers, notification.to_string())),
    )
    .await;
    assert_eq!(status, 500, "a Market notification while away: {text}");
    assert!(text.contains("store_unavailable"), "{text}");
    // Still refusing, and still alive, after the dispatcher has failed
    // and backed off several times (≈1 s of steady posting).
    let refused_now = poster.count(503);
    poster
        .wait_for(503, refused_now, 100, "later in the outage", &serve)
        .await;
    assert!(serve.alive(), "the service exited:\n{}", serve.log_text());

    pg.start_server();
    let accepted_before = poster.count(202);
    poster
        .wait_for(202, accepted_before, 10, "after the outage", &serve)
        .await;
    let posted = poster.stop().await;
    assert!(
        posted.iter().all(|p| matches!(p.status, 202 | 503)),
        "only 202 and 503: {:?}",
        posted.iter().map(|p| p.status).collect::<Vec<_>>()
    );

    let log = check_recovered(&mut serve, &market, &posted).await;
    assert!(
        !log.contains(&password),
        "the password is in the log:\n{log}"
    );
    drop(serve);
    market.stop().await;
}

/// A sample event of another source (`examples/events/<source>/`).
#[cfg_attr(not(postgres_tests), allow(dead_code))] // used by the PostgreSQL outage tests
fn sample_of(source: &str, name: &str) -> Value {
    let text =
        std::fs::read_to_string(repo().join(format!("examples/events/{source}/{name}.json")))
            .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None`, with the reason, where mounting is not allowed.
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Self(at.to_owned()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes into `path` until the disk refuses.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[actix_rt::test]
async fn a_full_sqlite_disk_refuses_webhooks_with_503_loses_nothing_and_works_when_space_returns() {
    let market = fake();
    let root = ServeRoot::new(&market);
    let disk = match Tmpfs::mount(&root.dir.path().join("disk"), "2m") {
        Ok(d) => d,
        Err(why) => {
            eprintln!(
                "SKIPPED: the SQLite disk-full test needs a tmpfs mount, refused here: {why}"
            );
            return;
        }
    };
    let url = format!("sqlite://{}", disk.0.join("db.sqlite").display());
    let mut serve = root.start(&[("CHATBRIDGE__STORAGE__URL", &url)]).await;

    let poster = Poster::start(&serve.base, 800_000);
    poster
        .wait_for(202, 0, 5, "before the disk fills", &serve)
        .await;
    fill(&disk.0.join("filler"));
    poster
        .wait_for(503, 0, 10, "with the disk full", &serve)
        .await;
    check_refusing(&mut serve).await;

    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let accepted_before = poster.count(202);
    poster
        .wait_for(202, accepted_before, 10, "with space again", &serve)
        .await;
    let posted = poster.stop().await;
    check_recovered(&mut serve, &market, &posted).await;
    drop(serve);
    drop(disk);
    market.stop().await;
}
