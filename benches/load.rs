//! Load benchmark: `cargo bench --bench load` (add `-- --quick`, or set
//! `BENCH_QUICK=1`, for a run of about a minute).
//!
//! It runs the release binary (`chatbridge serve` and `chatbridge
//! fake-market`, a copy made at the start so a rebuild meanwhile cannot
//! swap it) as child processes on 127.0.0.1, so the memory figures are the
//! service's own, and drives them from this process:
//!
//! - disk: 4 KiB appended and fdatasync'd, in the stores' folder, at the
//!   start, just before the ingest and at the end (it moves under other
//!   loads, and every commit waits for it);
//! - render: routes + templates rendered per second on one core, in process;
//! - ingest: signed webhooks over 64 keep-alive connections with the
//!   dispatcher paused (`market.hourly_limit = 1`): the way in alone;
//!   rate, latency percentiles, CPU per webhook, peak RSS;
//! - delivery: the service restarted on that backlog with its limits off
//!   (and the fake Market's off too): the dispatcher alone, for a bounded
//!   time; then, on a fresh store and fake Market, webhooks in while the
//!   dispatcher delivers, until every accepted message has arrived, and
//!   the count check: accepted = delivered at the fake Market = delivered
//!   in the store, one attempt each (nothing lost, nothing doubled), or
//!   the benchmark exits 1;
//! - queue size: stores seeded by a bulk insert with 1,000 and 1,000,000
//!   queued deliveries (50 businesses × 1,000 chats): `Store::claim` + a
//!   send + `Store::record` on each (alternating, in process), the
//!   service's time from start to its first delivery on each, and its
//!   memory, ingest and `/metrics` while it works with 1M queued.
//!
//! Environment: `BENCH_QUICK=1`; `BENCH_DIR=path` puts the stores there
//! (default: the system temp dir); `BENCH_KEEP=1` keeps them (and the
//! service logs); `BENCH_BIN=path` runs another build of the binary (to
//! compare a change); `BENCH_STRICT=1` exits 1 when a target is missed too;
//! `BENCH_ONLY=disk,render,load,queue` runs only the steps named.
//! Every loop is bounded in count and time; every address is 127.0.0.1;
//! the child processes die with this one.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatbridge::clock::to_rfc3339;
use chatbridge::domain::BusinessId;
use chatbridge::pipeline::Pipeline;
use chatbridge::render::{event_context, EventMeta};
use chatbridge::store::{Attempt, SqliteStore, Store, Verdict};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_chatbridge");
/// The copy of `BIN` this run uses, so a rebuild meanwhile cannot swap it.
static BIN_COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn bin() -> &'static Path {
    BIN_COPY
        .get()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new(BIN))
}
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The shipped demo secret of source `oms` (config/chatbridge.toml).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const API_KEY: &str = "bench-api-key";
const FIRST_BUSINESS: i64 = 1001;
const BUSINESSES: i64 = 50;
const CHATS_PER_BUSINESS: i64 = 1000;
const CONNECTIONS: usize = 64;
/// Quota that never binds (the setting must be at least 1).
const NO_LIMIT: &str = "1000000000";

struct Plan {
    quick: bool,
    fsync_writes: usize,
    render_secs: f64,
    ingest_secs: f64,
    ingest_max: u64,
    drain_secs: f64,
    e2e_secs: f64,
    e2e_max: u64,
    e2e_wait_secs: f64,
    scale_iters: usize,
    scale_secs: f64,
    first_delivery_secs: f64,
    big_queue: usize,
    small_queue: usize,
    rss_posts: u64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                fsync_writes: 200,
                render_secs: 0.5,
                ingest_secs: 3.0,
                ingest_max: 60_000,
                drain_secs: 4.0,
                e2e_secs: 3.0,
                e2e_max: 10_000,
                e2e_wait_secs: 60.0,
                scale_iters: 100,
                scale_secs: 5.0,
                first_delivery_secs: 20.0,
                big_queue: 1_000_000,
                small_queue: 1_000,
                rss_posts: 2_000,
            }
        } else {
            Self {
                quick,
                fsync_writes: 2_000,
                render_secs: 3.0,
                ingest_secs: 15.0,
                ingest_max: 1_000_000,
                drain_secs: 20.0,
                e2e_secs: 15.0,
                e2e_max: 50_000,
                e2e_wait_secs: 600.0,
                scale_iters: 400,
                scale_secs: 30.0,
                first_delivery_secs: 120.0,
                big_queue: 1_000_000,
                small_queue: 1_000,
                rss_posts: 10_000,
            }
        }
    }
}

// ───────────────────────── report ─────────────────────────

struct Row {
    section: &'static str,
    metric: String,
    value: String,
    target: String,
    ok: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// Correctness failures: the run is invalid, exit 1.
    failures: Vec<String>,
}

impl Report {
    fn row(&mut self, section: &'static str, metric: impl Into<String>, value: impl Into<String>) {
        self.rows.push(Row {
            section,
            metric: metric.into(),
            value: value.into(),
            target: String::new(),
            ok: None,
        });
    }

    fn target(
        &mut self,
        section: &'static str,
        metric: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        ok: bool,
    ) {
        self.rows.push(Row {
            section,
            metric: metric.into(),
            value: value.into(),
            target: target.into(),
            ok: Some(ok),
        });
    }

    fn fail(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("[bench] FAILURE: {what}");
        self.failures.push(what);
    }

    fn print(&self) {
        let w_metric = self
            .rows
            .iter()
            .map(|r| r.metric.chars().count())
            .max()
            .unwrap_or(0);
        let w_value = self
            .rows
            .iter()
            .map(|r| r.value.chars().count())
            .max()
            .unwrap_or(0);
        let w_target = self
            .rows
            .iter()
            .map(|r| r.target.chars().count())
            .max()
            .unwrap_or(0);
        let mut sections: Vec<&'static str> = Vec::new();
        for r in &self.rows {
            if !sections.contains(&r.section) {
                sections.push(r.section);
            }
        }
        println!();
        for section in sections {
            println!("{section}");
            for r in self.rows.iter().filter(|r| r.section == section) {
                let verdict = match r.ok {
                    Some(true) => "ok",
                    Some(false) => "MISS",
                    None => "",
                };
                println!(
                    "  {}  {}  {}  {verdict}",
                    pad(&r.metric, w_metric),
                    pad(&r.value, w_value),
                    pad(&r.target, w_target)
                );
            }
        }
    }
}

fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    format!("{s}{}", " ".repeat(width.saturating_sub(n)))
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

fn thousands(n: f64) -> String {
    let n = n.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn ms(us: f64) -> String {
    if us >= 100_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.0} µs", us)
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ───────────────────────── processes ─────────────────────────

struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn alive(&mut self) -> Result<(), String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => Err(format!(
                "{} exited ({status}); its log ({}) ends:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            )),
            _ => Err(format!("{} is not running", self.name)),
        }
    }

    /// SIGTERM (graceful), then SIGKILL after the grace period. Returns how
    /// long it took and whether SIGTERM was enough.
    fn stop(&mut self) -> (Duration, bool) {
        let Some(mut child) = self.child.take() else {
            return (Duration::ZERO, true);
        };
        let started = Instant::now();
        // SAFETY: kill(2) on the id of a child we have not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let grace = Duration::from_secs(STOP_GRACE_SECS.load(std::sync::atomic::Ordering::Relaxed));
        while started.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return (started.elapsed(), true);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        log(format!(
            "{} did not stop on SIGTERM in {} s; killing it",
            self.name,
            grace.as_secs()
        ));
        let _ = child.kill();
        let _ = child.wait();
        (started.elapsed(), false)
    }
}

/// How long `Proc::stop` waits after SIGTERM.
static STOP_GRACE_SECS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(15);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Children die with this process, however it ends (Ctrl-C, a panic, a kill).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn wait_ready(proc_: &mut Proc, addr: SocketAddr, path: &str) -> Result<Duration, String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        proc_.alive()?;
        if let Ok((200, _)) = http(addr, "GET", path, &[], b"") {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("{} did not answer {path} within 60 s", proc_.name))
}

fn start_fake(dir: &Path) -> Result<(Proc, SocketAddr), String> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = dir.join(format!("fake-market-{}.log", addr.port()));
    let out = File::create(&log_path).map_err(|e| e.to_string())?;
    let child = die_with_parent(&mut Command::new(bin()))
        .args(["fake-market", "--listen", &addr.to_string()])
        .args(["--hourly-limit", "0", "--max-in-flight", "0"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin().display()))?;
    let mut p = Proc {
        name: "fake-market",
        child: Some(child),
        log: log_path,
    };
    wait_ready(&mut p, addr, "/_fake/stats")?;
    Ok((p, addr))
}

/// Starts `chatbridge serve` on `db`; returns it once `/healthz` answers.
fn start_service(
    dir: &Path,
    db: &Path,
    market: SocketAddr,
    hourly_limit: &str,
) -> Result<(Proc, SocketAddr, Instant, Duration), String> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = dir.join(format!("service-{}.log", addr.port()));
    let out = File::create(&log_path).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin());
    cmd.current_dir(ROOT)
        .args(["serve", "--config", "config"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out);
    for (k, _) in std::env::vars() {
        if k.starts_with("CHATBRIDGE__") {
            cmd.env_remove(k);
        }
    }
    cmd.env(
        "CHATBRIDGE__STORAGE__URL",
        format!("sqlite://{}", db.display()),
    )
    .env("CHATBRIDGE__SERVER__LISTEN", addr.to_string())
    .env("CHATBRIDGE__MARKET__BASE_URL", format!("http://{market}"))
    .env("CHATBRIDGE__MARKET__API_KEY", API_KEY)
    .env("CHATBRIDGE__MARKET__HOURLY_LIMIT", hourly_limit)
    .env("CHATBRIDGE__MARKET__MAX_IN_FLIGHT", "4");
    let spawned = Instant::now();
    let child = die_with_parent(&mut cmd)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin().display()))?;
    let mut p = Proc {
        name: "chatbridge serve",
        child: Some(child),
        log: log_path,
    };
    let ready = wait_ready(&mut p, addr, "/healthz")?;
    Ok((p, addr, spawned, ready))
}

/// `(VmHWM, VmRSS)` in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

// ───────────────────────── HTTP (hand-rolled, HTTP/1.1, loopback) ─────────────────────────

struct Head {
    len: usize,
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(buf: &[u8]) -> Option<Result<Head, String>> {
    let end = find(buf, b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let Some(status) = status else {
        return Some(Err(format!("bad status line: {text}")));
    };
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                content_length = v.trim().parse().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    Some(Ok(Head {
        len: end + 4,
        status,
        content_length,
        chunked,
    }))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// One request on a fresh connection (`Connection: close`).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(body).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let head = parse_head(&buf).ok_or("no HTTP answer")??;
    let rest = &buf[head.len..];
    let body = if head.chunked {
        dechunk(rest).ok_or("bad chunked body")?
    } else {
        rest.to_vec()
    };
    Ok((head.status, body))
}

/// A keep-alive connection for one request at a time (blocking).
struct KeepAlive {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one request; a reused connection the server has closed
    /// meanwhile (keep-alive timeout) is replaced once.
    fn request(&mut self, raw: &[u8]) -> Result<u16, String> {
        let reused = self.stream.is_some();
        match self.request_once(raw) {
            Err(e) if reused => {
                log(format!("keep-alive connection lost ({e}); reconnecting"));
                self.request_once(raw)
            }
            other => other,
        }
    }

    fn request_once(&mut self, raw: &[u8]) -> Result<u16, String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().unwrap();
        let result = (|| {
            s.write_all(raw).map_err(|e| e.to_string())?;
            self.buf.clear();
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(head) = parse_head(&self.buf) {
                    let head = head?;
                    let need = head.len + head.content_length.ok_or("no content-length")?;
                    if self.buf.len() >= need {
                        return Ok(head.status);
                    }
                }
                let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed".to_string());
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })();
        if result.is_err() {
            self.stream = None;
        }
        result
    }
}

fn fake_counts(market: SocketAddr) -> Result<(u64, u64), String> {
    let (status, body) = http(market, "GET", "/_fake/stats", &[], b"")?;
    if status != 200 {
        return Err(format!("fake Market /_fake/stats answered {status}"));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let requests = v["requests"].as_u64().unwrap_or(0);
    let ok = v["by_status"]["200"].as_u64().unwrap_or(0);
    Ok((requests, ok))
}

// ───────────────────────── webhooks ─────────────────────────

struct Webhooks {
    sample: serde_json::Map<String, Value>,
    host: String,
    tag: String,
    /// Added to the index to make order ids unique across phases.
    order_base: u64,
}

impl Webhooks {
    fn new(sample: &Value, host: SocketAddr, tag: &str, order_base: u64) -> Self {
        Self {
            sample: sample
                .as_object()
                .cloned()
                .expect("the sample event is an object"),
            host: host.to_string(),
            tag: tag.to_owned(),
            order_base,
        }
    }

    /// Event `i`: business `i mod 50`, one of 1000 chats per business,
    /// a unique order id (so every message text is unique).
    fn request(&self, i: u64) -> Vec<u8> {
        let business = FIRST_BUSINESS + (i as i64 % BUSINESSES);
        let chat = 100_000 + (i as i64 / BUSINESSES) % CHATS_PER_BUSINESS;
        let order = self.order_base + i;
        let id = format!("{}-{i}", self.tag);
        let mut event = self.sample.clone();
        event.insert("id".into(), Value::from(id.clone()));
        event.insert("businessId".into(), Value::from(business));
        event.insert("chatId".into(), Value::from(chat));
        event.insert("orderId".into(), Value::from(order));
        let body = serde_json::to_vec(&event).expect("JSON");
        let ts = now_ms() / 1000;
        let signature = chatbridge::ingest::signature::sign(SECRET, &id, ts, &body)
            .expect("the secret is valid");
        let mut req = format!(
            "POST /hooks/oms HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             webhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {signature}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        req
    }
}

#[derive(Default)]
struct LoadResult {
    /// 202 with a queued delivery.
    accepted: u64,
    other: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
    elapsed: Duration,
    /// CPU seconds the generator (this process) used meanwhile.
    generator_cpu: f64,
}

impl LoadResult {
    fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64()
    }
}

async fn exchange(
    stream: &mut tokio::net::TcpStream,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(u16, bool), String> {
    stream.write_all(req).await.map_err(|e| e.to_string())?;
    buf.clear();
    loop {
        if let Some(head) = parse_head(buf) {
            let head = head?;
            let need = head.len + head.content_length.ok_or("no content-length")?;
            if buf.len() >= need {
                let queued = find(&buf[head.len..need], b"\"queued\"").is_some();
                return Ok((head.status, queued));
            }
        }
        let n = stream.read_buf(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed by the service".into());
        }
    }
}

/// Posts webhooks `0..max` over `connections` keep-alive connections until
/// all are sent or `secs` have passed.
fn run_load(
    addr: SocketAddr,
    hooks: &Webhooks,
    connections: usize,
    secs: f64,
    max: u64,
) -> LoadResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let next = Cell::new(0u64);
    let result = RefCell::new(LoadResult::default());
    let cpu_before = cpu_secs("self");
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    rt.block_on(async {
        let conn = |_: usize| async {
            let mut stream: Option<tokio::net::TcpStream> = None;
            let mut buf = Vec::with_capacity(4096);
            let mut latencies = Vec::with_capacity(4096);
            loop {
                let i = next.get();
                if i >= max || Instant::now() >= deadline {
                    break;
                }
                next.set(i + 1);
                let req = hooks.request(i);
                if stream.is_none() {
                    match tokio::net::TcpStream::connect(addr).await {
                        Ok(s) => {
                            s.set_nodelay(true).ok();
                            stream = Some(s);
                        }
                        Err(e) => {
                            {
                                let mut r = result.borrow_mut();
                                r.errors += 1;
                                r.first_error.get_or_insert(format!("connect: {e}"));
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let s = stream.as_mut().unwrap();
                let t0 = Instant::now();
                let answer =
                    tokio::time::timeout(Duration::from_secs(30), exchange(s, &req, &mut buf))
                        .await;
                let took = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                let mut r = result.borrow_mut();
                match answer {
                    Ok(Ok((202, true))) => {
                        r.accepted += 1;
                        latencies.push(took);
                    }
                    Ok(Ok((status, _))) => {
                        *r.other.entry(status).or_default() += 1;
                        latencies.push(took);
                        if r.first_error.is_none() {
                            r.first_error = Some(format!(
                                "status {status}: {}",
                                String::from_utf8_lossy(&buf[..buf.len().min(600)])
                            ));
                        }
                    }
                    Ok(Err(e)) => {
                        r.errors += 1;
                        r.first_error.get_or_insert(e);
                        stream = None;
                    }
                    Err(_) => {
                        r.errors += 1;
                        r.first_error.get_or_insert("no answer in 30 s".into());
                        stream = None;
                    }
                }
            }
            result.borrow_mut().latencies_us.extend(latencies);
        };
        futures_util::future::join_all((0..connections).map(conn)).await;
    });
    let mut r = result.into_inner();
    r.elapsed = started.elapsed();
    r.generator_cpu = cpu_secs("self") - cpu_before;
    r.latencies_us.sort_unstable();
    r
}

fn check_load(report: &mut Report, phase: &str, r: &LoadResult) {
    if r.errors > 0 || !r.other.is_empty() {
        report.fail(format!(
            "{phase}: {} transport errors, other statuses {:?}; first: {}",
            r.errors,
            r.other,
            r.first_error.as_deref().unwrap_or("-")
        ));
    }
}

/// Waits until the fake Market has `expected` messages answered 200:
/// stops when it has them, when nothing moved for 30 s, or after `limit`.
fn wait_delivered(
    market: SocketAddr,
    expected: u64,
    limit: Duration,
) -> Result<(u64, u64, Instant), String> {
    let started = Instant::now();
    let mut last = (0, 0);
    let mut moved = Instant::now();
    loop {
        let counts = fake_counts(market)?;
        if counts.1 >= expected {
            return Ok((counts.0, counts.1, Instant::now()));
        }
        if counts != last {
            last = counts;
            moved = Instant::now();
        }
        if moved.elapsed() > Duration::from_secs(30) || started.elapsed() > limit {
            return Ok((counts.0, counts.1, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ───────────────────────── phases ─────────────────────────

/// Appends 4 KiB and fdatasyncs it, `n` times, in the store's folder.
fn fsync_latency(report: &mut Report, dir: &Path, n: usize, when: &str) -> Result<(), String> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| e.to_string())?;
    let block = vec![0x5au8; 4096];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        f.write_all(&block).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        lat.push(t0.elapsed().as_micros() as u32);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    lat.sort_unstable();
    report.row(
        "disk (the store's directory)",
        format!("fsync {when}: append 4 KiB + fdatasync, n={n}"),
        format!("p50 {}  p99 {}", ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99))),
    );
    Ok(())
}

fn render_rate(report: &mut Report, sample: &Value, secs: f64) -> Result<(), String> {
    let pipeline = Pipeline::load(&Path::new(ROOT).join("config"))
        .map_err(|p| format!("loading config/: {}", p.join("; ")))?;
    let meta = EventMeta {
        source: "oms".into(),
        event_type: "order.shipped".into(),
        id: "evt-1001".into(),
        received_at: to_rfc3339(now_ms()),
    };
    // Routing + business/chat id templates + the text, as ingest does.
    let planned = pipeline.plan(sample, &meta);
    if planned.len() != 1 || planned[0].rendered.is_err() {
        return Err("order_shipped does not render for the sample event".into());
    }
    let budget = Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < budget {
        for _ in 0..100 {
            let p = pipeline.plan(sample, &meta);
            std::hint::black_box(&p);
        }
        n += 100;
    }
    let plan_rate = n as f64 / t0.elapsed().as_secs_f64();
    let context = event_context(sample, &meta);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < budget {
        for _ in 0..100 {
            let text = pipeline
                .renderer
                .render_text("order_shipped", &context)
                .map_err(|e| e.to_string())?;
            std::hint::black_box(&text);
        }
        n += 100;
    }
    let text_rate = n as f64 / t0.elapsed().as_secs_f64();
    report.row(
        "render (in process, 1 thread)",
        "order_shipped: route + ids + text (Pipeline::plan)",
        format!("{} /s per core", thousands(plan_rate)),
    );
    report.row(
        "render (in process, 1 thread)",
        "order_shipped: text only (Renderer::render_text)",
        format!("{} /s per core", thousands(text_rate)),
    );
    Ok(())
}

/// Ingest alone, then the dispatcher alone on that backlog; then, on a
/// fresh store, both at once and the count check. Returns the service's
/// peak RSS.
fn load_phases(
    report: &mut Report,
    plan: &Plan,
    dir: &Path,
    sample: &Value,
) -> Result<u64, String> {
    let db = dir.join("ingest.db");
    let (mut fake, market) = start_fake(dir)?;

    // The disk changes under other loads: look at it again just before.
    fsync_latency(report, dir, plan.fsync_writes / 2, "before ingest")?;

    // 1. Ingest with the dispatcher paused by its quota (1 send per business per hour).
    log("ingest: service with market.hourly_limit = 1 (dispatcher paused)");
    let (mut svc, addr, _, _) = start_service(dir, &db, market, "1")?;
    let warm = run_load(
        addr,
        &Webhooks::new(sample, addr, "warm", 0),
        CONNECTIONS,
        10.0,
        1_000,
    );
    check_load(report, "warm-up", &warm);
    let pid = svc.pid().to_string();
    let cpu0 = cpu_secs(&pid);
    let ingest = run_load(
        addr,
        &Webhooks::new(sample, addr, "ingest", 1_000),
        CONNECTIONS,
        plan.ingest_secs,
        plan.ingest_max,
    );
    let svc_cpu = cpu_secs(&pid) - cpu0;
    svc.alive()?;
    check_load(report, "ingest", &ingest);
    let (hwm_ingest, _) = memory_kib(svc.pid());
    svc.stop();
    let sec = "ingest (64 connections, dispatcher paused)";
    let rate = ingest.rate();
    report.target(
        sec,
        format!(
            "accepted (202, durable): {} in {:.1} s",
            thousands(ingest.accepted as f64),
            ingest.elapsed.as_secs_f64()
        ),
        format!("{} /s", thousands(rate)),
        "≥ 20,000 /s",
        rate >= 20_000.0,
    );
    let l = &ingest.latencies_us;
    let p99 = pct(l, 0.99);
    report.target(
        sec,
        "latency p50 / p99 / p99.9",
        format!("{} / {} / {}", ms(pct(l, 0.5)), ms(p99), ms(pct(l, 0.999))),
        "p99 ≤ 10 ms",
        p99 <= 10_000.0,
    );
    report.row(
        sec,
        "CPU: service / load generator",
        format!(
            "{:.0} µs / {:.0} µs per webhook ({:.2} + {:.2} cores)",
            svc_cpu * 1e6 / ingest.accepted.max(1) as f64,
            ingest.generator_cpu * 1e6 / ingest.accepted.max(1) as f64,
            svc_cpu / ingest.elapsed.as_secs_f64(),
            ingest.generator_cpu / ingest.elapsed.as_secs_f64()
        ),
    );
    report.row(sec, "service peak RSS (VmHWM)", mib(hwm_ingest));

    // 2. Drain: that backlog, limits off; the dispatcher alone, for a bounded time.
    let backlog = warm.accepted + ingest.accepted;
    log(format!(
        "drain: restarting with limits off; {backlog} queued"
    ));
    let (mut svc, _, _, _) = start_service(dir, &db, market, NO_LIMIT)?;
    let pid = svc.pid().to_string();
    let (_, before) = fake_counts(market)?;
    let t1 = Instant::now();
    let cpu0 = cpu_secs(&pid);
    let fake_cpu0 = cpu_secs(&fake.pid().to_string());
    let (_, after, done) =
        wait_delivered(market, backlog, Duration::from_secs_f64(plan.drain_secs))?;
    let svc_cpu = cpu_secs(&pid) - cpu0;
    let fake_cpu = cpu_secs(&fake.pid().to_string()) - fake_cpu0;
    svc.alive()?;
    let (hwm_drain, _) = memory_kib(svc.pid());
    svc.stop();
    fake.stop();
    let drained = after - before;
    let drain_secs = done.duration_since(t1).as_secs_f64();
    let sec = "delivery (fake Market, limits off; 50 businesses, 4 in flight each)";
    report.row(
        sec,
        format!(
            "dispatcher alone, on that backlog: {} messages in {:.1} s",
            thousands(drained as f64),
            drain_secs
        ),
        format!("{} msg/s", thousands(drained as f64 / drain_secs)),
    );
    report.row(
        sec,
        "  CPU: service / fake Market",
        format!(
            "{:.0} µs / {:.0} µs per message ({:.2} + {:.2} cores)",
            svc_cpu * 1e6 / drained.max(1) as f64,
            fake_cpu * 1e6 / drained.max(1) as f64,
            svc_cpu / drain_secs,
            fake_cpu / drain_secs
        ),
    );
    report.row(sec, "  service peak RSS (VmHWM)", mib(hwm_drain));

    // 3. End to end on a fresh store and fake Market: webhooks in while the
    // dispatcher delivers, until every accepted one is delivered.
    log("end to end: webhooks in while delivering, fresh store");
    let db = dir.join("e2e.db");
    let (mut fake, market) = start_fake(dir)?;
    let (mut svc, addr, _, _) = start_service(dir, &db, market, NO_LIMIT)?;
    let pid = svc.pid().to_string();
    let cpu0 = cpu_secs(&pid);
    let t0 = Instant::now();
    let e2e = run_load(
        addr,
        &Webhooks::new(sample, addr, "e2e", 10_000_000),
        CONNECTIONS,
        plan.e2e_secs,
        plan.e2e_max,
    );
    check_load(report, "end to end", &e2e);
    let accepted = e2e.accepted;
    let (requests, delivered, done) = wait_delivered(
        market,
        accepted,
        Duration::from_secs_f64(plan.e2e_wait_secs),
    )?;
    let svc_cpu = cpu_secs(&pid) - cpu0;
    svc.alive()?;
    let e2e_secs = done.duration_since(t0).as_secs_f64();
    let e2e_rate = delivered as f64 / e2e_secs;
    report.target(
        sec,
        format!(
            "end to end: {} webhooks in {:.1} s, delivered after {:.1} s",
            thousands(accepted as f64),
            e2e.elapsed.as_secs_f64(),
            e2e_secs
        ),
        format!("{} msg/s", thousands(e2e_rate)),
        "≥ 10,000 /s",
        e2e_rate >= 10_000.0,
    );
    let l = &e2e.latencies_us;
    report.row(
        sec,
        "  webhooks meanwhile: rate; latency p50 / p99 / p99.9",
        format!(
            "{} /s; {} / {} / {}",
            thousands(e2e.rate()),
            ms(pct(l, 0.5)),
            ms(pct(l, 0.99)),
            ms(pct(l, 0.999))
        ),
    );
    report.row(
        sec,
        "  CPU: service per message (in + out)",
        format!("{:.0} µs", svc_cpu * 1e6 / delivered.max(1) as f64),
    );

    // The count check: the fake Market's counts and the store's.
    let (hwm_e2e, _) = memory_kib(svc.pid());
    std::thread::sleep(Duration::from_millis(300));
    let (requests_late, delivered_late) = fake_counts(market)?;
    let counts = db_counts(&db)?;
    let store_delivered = counts.states.get("delivered").copied().unwrap_or(0);
    let not_delivered: Vec<String> = counts
        .states
        .iter()
        .filter(|(s, _)| s.as_str() != "delivered")
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    let ok = delivered_late == accepted
        && requests_late == delivered_late
        && requests == requests_late
        && store_delivered as u64 == accepted
        && counts.attempts as u64 == accepted
        && counts.doubled == 0
        && not_delivered.is_empty();
    report.target(
        sec,
        "count check: accepted = delivered (fake Market) = delivered (store)",
        format!(
            "{} = {} = {}",
            thousands(accepted as f64),
            thousands(delivered_late as f64),
            thousands(store_delivered as f64)
        ),
        "equal, none doubled",
        ok,
    );
    if !ok {
        report.fail(format!(
            "count check: accepted {accepted}, fake Market requests {requests_late} \
             (200: {delivered_late}), store delivered {store_delivered}, attempts {}, \
             deliveries with >1 delivered attempt {}, other states [{}]",
            counts.attempts,
            counts.doubled,
            not_delivered.join(", ")
        ));
    }
    report.row(
        sec,
        "  requests the fake Market received / answered 200",
        format!(
            "{} / {}",
            thousands(requests_late as f64),
            thousands(delivered_late as f64)
        ),
    );
    svc.stop();
    fake.stop();
    Ok(hwm_ingest.max(hwm_drain).max(hwm_e2e))
}

struct DbCounts {
    states: BTreeMap<String, i64>,
    attempts: i64,
    doubled: i64,
}

fn db_counts(db: &Path) -> Result<DbCounts, String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
    let e = |e: rusqlite::Error| e.to_string();
    let mut states = BTreeMap::new();
    let mut stmt = conn
        .prepare("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
        .map_err(e)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(e)?;
    for row in rows {
        let (s, n) = row.map_err(e)?;
        states.insert(s, n);
    }
    let attempts = conn
        .query_row("SELECT COUNT(*) FROM attempts", [], |r| r.get(0))
        .map_err(e)?;
    let doubled = conn
        .query_row(
            "SELECT COUNT(*) FROM (SELECT delivery_id FROM attempts WHERE outcome = 'delivered'
             GROUP BY delivery_id HAVING COUNT(*) > 1)",
            [],
            |r| r.get(0),
        )
        .map_err(e)?;
    Ok(DbCounts {
        states,
        attempts,
        doubled,
    })
}

/// Bulk-inserts `n` queued deliveries (and their events) into a new store:
/// 50 businesses, 1000 chats each, due over the past hour.
fn seed(path: &Path, n: usize, sample_body: &str, text: &str) -> Result<Duration, String> {
    let t0 = Instant::now();
    let _ = std::fs::remove_file(path);
    // The service's own code creates the schema.
    drop(SqliteStore::open(path).map_err(|e| e.to_string())?);
    let e = |e: rusqlite::Error| e.to_string();
    let mut conn = rusqlite::Connection::open(path).map_err(e)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(e)?;
    // Out of WAL for the bulk load (the writer thread may still be closing).
    let mut mode = String::new();
    for _ in 0..250 {
        match conn.query_row("PRAGMA journal_mode = DELETE", [], |r| {
            r.get::<_, String>(0)
        }) {
            Ok(m) if m == "delete" => {
                mode = m;
                break;
            }
            Ok(m) => mode = m,
            Err(err) => mode = err.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if mode != "delete" {
        return Err(format!(
            "cannot leave WAL mode for the bulk insert (mode {mode})"
        ));
    }
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")
        .map_err(e)?;
    // Indexes are dropped for the load and made again after it (faster).
    let indexes: Vec<(String, String)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL
             AND tbl_name IN ('events', 'deliveries')",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(e)?;
    let tx = conn.transaction().map_err(e)?;
    for (name, _) in &indexes {
        tx.execute_batch(&format!("DROP INDEX \"{name}\""))
            .map_err(e)?;
    }
    let start = now_ms() - 3_600_000;
    {
        let mut ev = tx
            .prepare(
                "INSERT INTO events (id, source, external_id, event_type, payload, received_at)
                 VALUES (?1, 'oms', ?2, 'order.shipped', ?3, ?4)",
            )
            .map_err(e)?;
        let mut de = tx
            .prepare(
                "INSERT INTO deliveries (id, event_id, route, template, business_id, chat_id, text,
                     state, attempts, created_at, queued_at, next_attempt_at, updated_at)
                 VALUES (?1, ?1, 'order-shipped', 'order_shipped', ?2, ?3, ?4, 'queued', 0, ?5, ?5, ?5, ?5)",
            )
            .map_err(e)?;
        for i in 0..n as i64 {
            let business = FIRST_BUSINESS + i % BUSINESSES;
            let chat = 100_000 + (i / BUSINESSES) % CHATS_PER_BUSINESS;
            let order = (90_000_000 + i).to_string();
            let external = format!("seed-{i:09}");
            let at = start + i * 3_000_000 / n as i64;
            let payload = sample_body
                .replace("evt-1001", &external)
                .replace("51234567", &order);
            ev.execute(rusqlite::params![i + 1, external, payload, at])
                .map_err(e)?;
            de.execute(rusqlite::params![
                i + 1,
                business,
                chat,
                text.replace("51234567", &order),
                at
            ])
            .map_err(e)?;
        }
    }
    for (_, sql) in &indexes {
        tx.execute_batch(sql).map_err(e)?;
    }
    tx.commit().map_err(e)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(e)?;
    if mode != "wal" {
        return Err(format!("cannot return to WAL mode (mode {mode})"));
    }
    drop(conn);
    // The load ran with synchronous = OFF: write it all back now, or the
    // service's first checkpoint pays for the whole file.
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("syncing {}: {e}", path.display()))?;
    Ok(t0.elapsed())
}

#[derive(Default)]
struct ScaleResult {
    claim_us: Vec<u32>,
    send_us: Vec<u32>,
    record_us: Vec<u32>,
    cycle_us: Vec<u32>,
    businesses_us: Vec<u32>,
}

/// One claim + send + record on `store`, timed: `(claim, send, record)`.
async fn claim_send_record(
    store: &SqliteStore,
    client: &mut KeepAlive,
    market: SocketAddr,
    business: BusinessId,
) -> Result<(Duration, Duration, Duration), String> {
    let now = now_ms();
    let t1 = Instant::now();
    let claimed = store
        .claim(business, now, now + 60_000, 1, false)
        .await
        .map_err(|e| e.to_string())?;
    let t2 = Instant::now();
    let Some(c) = claimed.into_iter().next() else {
        return Err(format!("nothing to claim for business {}", business.0));
    };
    let body = serde_json::to_vec(&serde_json::json!({ "message": c.text })).unwrap();
    let mut req = format!(
        "POST /v2/businesses/{}/chats/message?chatId={} HTTP/1.1\r\nHost: {market}\r\n\
         Api-Key: {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        c.business_id.0,
        c.chat_id.0,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let status = client
        .request(&req)
        .map_err(|e| format!("sending to the fake Market: {e}"))?;
    let t3 = Instant::now();
    if status != 200 {
        return Err(format!("the fake Market answered {status}"));
    }
    let finished = now_ms();
    store
        .record(
            Attempt {
                delivery_id: c.id,
                business_id: c.business_id,
                started_at: now,
                finished_at: finished,
                latency_ms: (t3 - t2).as_millis() as i64,
                http_status: Some(200),
                api_errors: vec![],
                error: None,
                counts_for_quota: true,
                verdict: Verdict::Delivered,
            },
            finished,
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((t2 - t1, t3 - t2, t3.elapsed()))
}

/// `Store::claim` of one delivery, its send to the fake Market and its
/// `Store::record`, in process, alternating between the stores (so that
/// disk noise falls on both alike), round the businesses: `iters` times
/// each or until `budget` is spent. Then `Store::queued_businesses` (what
/// every dispatcher round asks first) up to 5 times on each store, within
/// `budget`, when `with_businesses`.
fn scale(
    dbs: [&Path; 2],
    market: SocketAddr,
    iters: usize,
    budget: Duration,
    with_businesses: bool,
) -> Result<[ScaleResult; 2], String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let stores = [
            SqliteStore::open(dbs[0]).map_err(|e| e.to_string())?,
            SqliteStore::open(dbs[1]).map_err(|e| e.to_string())?,
        ];
        let mut client = KeepAlive::new(market);
        let mut results: [ScaleResult; 2] = Default::default();
        let warmup = 5;
        let started = Instant::now();
        let us = |d: Duration| d.as_micros() as u32;
        for k in 0..iters + warmup {
            if started.elapsed() > budget && k > warmup + 5 {
                break;
            }
            let business = BusinessId(FIRST_BUSINESS + (k as i64 % BUSINESSES));
            for (store, r) in stores.iter().zip(results.iter_mut()) {
                let (claim, send, record) =
                    claim_send_record(store, &mut client, market, business).await?;
                if k >= warmup {
                    r.claim_us.push(us(claim));
                    r.send_us.push(us(send));
                    r.record_us.push(us(record));
                    r.cycle_us.push(us(claim + send + record));
                }
            }
        }
        if with_businesses {
            for (store, r) in stores.iter().zip(results.iter_mut()) {
                let started = Instant::now();
                for _ in 0..5 {
                    let t0 = Instant::now();
                    let found = store.queued_businesses().await.map_err(|e| e.to_string())?;
                    r.businesses_us.push(us(t0.elapsed()));
                    if found.len() != BUSINESSES as usize {
                        return Err(format!(
                            "queued_businesses found {} businesses",
                            found.len()
                        ));
                    }
                    if started.elapsed() > budget {
                        break;
                    }
                }
            }
        }
        for r in results.iter_mut() {
            for v in [
                &mut r.claim_us,
                &mut r.send_us,
                &mut r.record_us,
                &mut r.cycle_us,
                &mut r.businesses_us,
            ] {
                v.sort_unstable();
            }
        }
        Ok(results)
    })
}

/// Seeds stores with 1k and 1M queued deliveries; claim cost with each,
/// the service's time to first delivery with each, and its memory with 1M.
fn queue_phases(
    report: &mut Report,
    plan: &Plan,
    dir: &Path,
    sample: &Value,
    sample_body: &str,
) -> Result<u64, String> {
    let pipeline = Pipeline::load(&Path::new(ROOT).join("config"))
        .map_err(|p| format!("loading config/: {}", p.join("; ")))?;
    let meta = EventMeta {
        source: "oms".into(),
        event_type: "order.shipped".into(),
        id: "evt-1001".into(),
        received_at: to_rfc3339(now_ms()),
    };
    let text = pipeline
        .renderer
        .render_text("order_shipped", &event_context(sample, &meta))
        .map_err(|e| e.to_string())?;

    let small = dir.join("queue-1k.db");
    let big = dir.join("queue-1m.db");
    seed(&small, plan.small_queue, sample_body, &text)?;
    log(format!(
        "seeding {} queued deliveries",
        thousands(plan.big_queue as f64)
    ));
    let took = seed(&big, plan.big_queue, sample_body, &text)?;
    let size = std::fs::metadata(&big).map(|m| m.len()).unwrap_or(0);
    let sec = "queue size (1,000 vs 1,000,000 queued; 50 businesses × 1,000 chats)";
    report.row(
        sec,
        format!(
            "bulk insert of {} deliveries + events (+ fsync)",
            thousands(plan.big_queue as f64)
        ),
        format!(
            "{:.1} s, file {:.0} MB",
            took.as_secs_f64(),
            size as f64 / 1e6
        ),
    );

    let (mut fake, market) = start_fake(dir)?;
    log("claim + send + record at 1k and 1M queued (Store API, in process)");
    let budget = Duration::from_secs_f64(plan.scale_secs);
    // Each iteration takes one delivery from each store: leave most queued.
    let iters = plan.scale_iters.min(plan.small_queue / 2);
    let [s_small, s_big] = scale([&small, &big], market, iters, budget, !plan.quick)?;
    let line = |r: &ScaleResult, v: fn(&ScaleResult) -> &Vec<u32>| {
        format!("p50 {}  p99 {}", ms(pct(v(r), 0.5)), ms(pct(v(r), 0.99)))
    };
    let claim_ratio = pct(&s_big.claim_us, 0.5) / pct(&s_small.claim_us, 0.5);
    let cycle_ratio = pct(&s_big.cycle_us, 0.5) / pct(&s_small.cycle_us, 0.5);
    report.row(
        sec,
        format!("Store::claim(1), 1k queued (n={})", s_small.claim_us.len()),
        line(&s_small, |r| &r.claim_us),
    );
    report.row(
        sec,
        format!("Store::claim(1), 1M queued (n={})", s_big.claim_us.len()),
        line(&s_big, |r| &r.claim_us),
    );
    report.row(
        sec,
        "claim + send + record, 1k queued",
        line(&s_small, |r| &r.cycle_us),
    );
    report.row(
        sec,
        "claim + send + record, 1M queued",
        line(&s_big, |r| &r.cycle_us),
    );
    report.row(
        sec,
        "  of which send / record (1M)",
        format!(
            "{} / {}",
            ms(pct(&s_big.send_us, 0.5)),
            ms(pct(&s_big.record_us, 0.5))
        ),
    );
    report.target(
        sec,
        "claim p50 at 1M ÷ at 1k (claim + send + record)",
        format!("{claim_ratio:.2}× ({cycle_ratio:.2}×)"),
        "≤ 2×",
        claim_ratio <= 2.0,
    );
    if !plan.quick {
        report.row(
            sec,
            format!(
                "Store::queued_businesses (each dispatcher round) 1k / 1M (n={}/{})",
                s_small.businesses_us.len(),
                s_big.businesses_us.len()
            ),
            format!(
                "p50 {} / {}",
                ms(pct(&s_small.businesses_us, 0.5)),
                ms(pct(&s_big.businesses_us, 0.5))
            ),
        );
    }

    // The service itself on each store: time to the first delivery from
    // its start (quota 20 per business, so it stops after 1,000 sends).
    let mut peak_big = 0;
    let mut first_small = None;
    for (label, db) in [("1k", &small), ("1M", &big)] {
        log(format!("service on the {label} store"));
        let (_, before) = fake_counts(market)?;
        let (mut svc, addr, spawned, ready) = start_service(dir, db, market, "20")?;
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs_f64(plan.first_delivery_secs);
        while Instant::now() < deadline {
            if fake_counts(market)?.1 > before {
                first = Some(spawned.elapsed());
                break;
            }
            svc.alive()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        report.row(
            sec,
            format!("service start → first delivery, {label} queued"),
            match first {
                Some(d) => format!(
                    "{} (/healthz after {})",
                    ms(d.as_micros() as f64),
                    ms(ready.as_micros() as f64)
                ),
                None => format!("none within {:.0} s", plan.first_delivery_secs),
            },
        );
        match (label, first) {
            ("1k", f) => first_small = f,
            (_, f) => {
                let (ok, value) = match (first_small, f) {
                    (Some(a), Some(b)) => {
                        let ratio = b.as_secs_f64() / a.as_secs_f64();
                        (ratio <= 2.0, format!("{ratio:.2}×"))
                    }
                    _ => (false, "no first delivery".to_string()),
                };
                report.target(
                    sec,
                    "first delivery after start: 1M ÷ 1k",
                    value,
                    "≤ 2×",
                    ok,
                );
            }
        }
        if label == "1M" {
            // Work with the big queue: webhooks in, the quota's sends out, /metrics.
            let hooks = Webhooks::new(sample, addr, "big", 50_000_000);
            let r = run_load(addr, &hooks, CONNECTIONS, 30.0, plan.rss_posts);
            check_load(report, "ingest with 1M queued", &r);
            let metrics = Instant::now();
            let (status, _) = http(addr, "GET", "/metrics", &[], b"")?;
            let metrics_took = metrics.elapsed();
            if status != 200 {
                report.fail(format!("/metrics answered {status}"));
            }
            std::thread::sleep(Duration::from_secs(1));
            svc.alive()?;
            let (hwm, rss) = memory_kib(svc.pid());
            peak_big = hwm;
            report.row(
                sec,
                format!(
                    "webhooks with 1M queued ({} posted)",
                    thousands(plan.rss_posts as f64)
                ),
                format!(
                    "{} /s; p50 {}  p99 {}",
                    thousands(r.rate()),
                    ms(pct(&r.latencies_us, 0.5)),
                    ms(pct(&r.latencies_us, 0.99))
                ),
            );
            report.row(
                sec,
                "GET /metrics with 1M queued",
                ms(metrics_took.as_micros() as f64),
            );
            report.target(
                sec,
                "service peak RSS (VmHWM) with 1M queued; RSS now",
                format!("{}; {}", mib(hwm), mib(rss)),
                "≤ 100 MB",
                hwm <= 100 * 1024,
            );
        }
        let (took, graceful) = svc.stop();
        report.row(
            sec,
            format!("shutdown on SIGTERM, {label} queued"),
            if graceful {
                ms(took.as_micros() as f64)
            } else {
                format!("not within {:.0} s: killed", took.as_secs_f64())
            },
        );
    }
    fake.stop();
    Ok(peak_big)
}

/// The commit the source is at, and whether the tree differs from it.
fn source_revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(ROOT)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no", "--", "src"])
                .is_some_and(|s| !s.is_empty());
            format!(
                "{rev}{}",
                if dirty {
                    " + uncommitted changes in src/"
                } else {
                    ""
                }
            )
        }
        None => "unknown".into(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let strict = std::env::var("BENCH_STRICT").is_ok_and(|v| !v.is_empty() && v != "0");
    let plan = Plan::new(quick);
    STOP_GRACE_SECS.store(
        if quick { 5 } else { 15 },
        std::sync::atomic::Ordering::Relaxed,
    );
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    if let Err(e) = std::fs::create_dir_all(&base) {
        eprintln!("cannot create {}: {e}", base.display());
        return ExitCode::FAILURE;
    }
    let tmp = match tempfile::Builder::new()
        .prefix("chatbridge-bench-")
        .tempdir_in(&base)
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot create a folder in {}: {e}", base.display());
            return ExitCode::FAILURE;
        }
    };
    let dir = tmp.path().to_path_buf();
    let sample_path = Path::new(ROOT).join("examples/events/oms/order_shipped.json");
    let sample_body = std::fs::read_to_string(&sample_path).expect("the shipped sample event");
    let sample: Value = serde_json::from_str(&sample_body).expect("the sample event is JSON");

    let started = Instant::now();
    let mut report = Report::default();
    let binary = std::env::var("BENCH_BIN").unwrap_or_else(|_| BIN.to_owned());
    let copy = dir.join("chatbridge");
    if let Err(e) = std::fs::copy(&binary, &copy) {
        eprintln!("cannot copy {binary} to {}: {e}", copy.display());
        return ExitCode::FAILURE;
    }
    let _ = BIN_COPY.set(copy);
    log(format!("binary {binary}; stores in {}", dir.display()));

    let mut peak_load = None;
    let mut peak_big = None;
    type Step<'a> = Box<dyn FnOnce(&mut Report) -> Result<(), String> + 'a>;
    let steps: Vec<(&str, Step)> = vec![
        (
            "disk",
            Box::new(|r| fsync_latency(r, &dir, plan.fsync_writes, "at start")),
        ),
        (
            "render",
            Box::new(|r| render_rate(r, &sample, plan.render_secs)),
        ),
        (
            "load",
            Box::new(|r| {
                peak_load = Some(load_phases(r, &plan, &dir, &sample)?);
                Ok(())
            }),
        ),
        (
            "queue",
            Box::new(|r| {
                peak_big = Some(queue_phases(r, &plan, &dir, &sample, &sample_body)?);
                Ok(())
            }),
        ),
        (
            "disk",
            Box::new(|r| fsync_latency(r, &dir, plan.fsync_writes, "at end")),
        ),
    ];
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    for (name, step) in steps {
        if !only.is_empty() && !only.split(',').any(|o| o.trim() == name) {
            continue;
        }
        log(format!(
            "{name} ({:.0} s so far)",
            started.elapsed().as_secs_f64()
        ));
        if let Err(e) = step(&mut report) {
            report.fail(format!("{name}: {e}"));
        }
    }
    if let Some(kib) = peak_load {
        report.target(
            "memory (the service's own, /proc/<pid>/status)",
            "peak RSS (VmHWM) during load: ingest, drain, end to end",
            mib(kib),
            "≤ 50 MB",
            kib <= 50 * 1024,
        );
    }
    if let Some(kib) = peak_big {
        report.target(
            "memory (the service's own, /proc/<pid>/status)",
            "peak RSS (VmHWM) with 1M queued",
            mib(kib),
            "≤ 100 MB",
            kib <= 100 * 1024,
        );
    }

    println!(
        "\nchatbridge load benchmark{} — {} cores, {:.0} s",
        if quick { " (quick)" } else { "" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    println!(
        "command: cargo bench --bench load{}",
        if quick { " -- --quick" } else { "" }
    );
    if std::env::var_os("BENCH_BIN").is_some() {
        println!("binary:  {binary}  (BENCH_BIN: not necessarily built from this tree)");
    } else {
        println!("binary:  {binary}  (source {})", source_revision());
    }
    println!("stores:  {}", dir.display());
    println!(
        "load average before / after: {} / {}  (the figures are only as quiet as the machine)",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    report.print();
    let missed: Vec<&Row> = report.rows.iter().filter(|r| r.ok == Some(false)).collect();
    println!();
    for f in &report.failures {
        println!("FAILED: {f}");
    }
    println!(
        "{} target(s) met, {} missed; {} failure(s)",
        report.rows.iter().filter(|r| r.ok == Some(true)).count(),
        missed.len(),
        report.failures.len()
    );
    if std::env::var("BENCH_KEEP").is_ok_and(|v| !v.is_empty() && v != "0") {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    }
    if !report.failures.is_empty() || (strict && !missed.is_empty()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
