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
//!   memory, ingest and `/metrics` while it works with 1M queued;
//! - postgres: load and queue again on PostgreSQL, plus the end to end
//!   with two instances on one database; its rate against SQLite's.
//!
//! Environment: `BENCH_QUICK=1`; `BENCH_DIR=path` puts the stores there
//! (default: the system temp dir); `BENCH_KEEP=1` keeps them (and the
//! service logs); `BENCH_BIN=path` runs another build of the binary (to
//! compare a change); `BENCH_STRICT=1` exits 1 when a target is missed too;
//! `BENCH_BASELINE_BIN=path` runs the SQLite end to end once more, right
//! after this build's, with that build's `serve` (same fake Market, same
//! load), and reports both rows and their ratio;
//! `BENCH_ONLY=disk,render,load,queue,postgres` runs only the steps named;
//! `BENCH_POSTGRES_URL=postgres://...` (else `CHATBRIDGE_TEST_POSTGRES_URL`)
//! names the PostgreSQL server for the `postgres` step, which makes a
//! database per phase on it and drops them at the end (skipped, saying
//! so, when neither is set); `BENCH_POSTGRES_QUEUE=0` leaves out its
//! 1M-queued steps.
//! Every loop is bounded in count and time; every address is 127.0.0.1;
//! the child processes die with this one.
//!
//! Files: one per phase (`disk_render.rs`, `ingest_delivery.rs`,
//! `queue.rs`) and what they share: `backend.rs` (SQLite or PostgreSQL), `report.rs` (the plan and the table),
//! `procs.rs` (child processes), `http.rs` (a raw HTTP client), `drive.rs`
//! (webhooks over many connections). This file runs the phases in order.
// The modules share one namespace through `use super::*`: they were one
// file, and a phase reads best with its helpers at hand.

pub(crate) use std::cell::{Cell, RefCell};
pub(crate) use std::collections::BTreeMap;
pub(crate) use std::fs::File;
pub(crate) use std::io::{Read, Write};
pub(crate) use std::net::{SocketAddr, TcpListener, TcpStream};
pub(crate) use std::path::{Path, PathBuf};
pub(crate) use std::process::{Child, Command, ExitCode, Stdio};
pub(crate) use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(crate) use chatbridge::clock::to_rfc3339;
pub(crate) use chatbridge::domain::{BusinessId, MarketMethod};
pub(crate) use chatbridge::pipeline::Pipeline;
pub(crate) use chatbridge::render::{EventContext, EventMeta};
pub(crate) use chatbridge::store::{Attempt, ClaimLimits, SqliteStore, Store, Verdict};
pub(crate) use serde_json::Value;
pub(crate) use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod backend;
mod disk_render;
mod drive;
mod http;
mod ingest_delivery;
mod procs;
mod queue;
mod report;
use backend::*;
use disk_render::*;
use drive::*;
use http::*;
use ingest_delivery::*;
use procs::*;
use queue::*;
use report::*;

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

/// The load and queue phases again on PostgreSQL (a database made for each,
/// dropped at the end), and the end to end with two instances on one
/// database; compared with SQLite's end to end when that ran.
fn postgres_phases(
    report: &mut Report,
    plan: &Plan,
    dir: &Path,
    sample: &Value,
    sample_body: &str,
    sqlite_e2e: Option<f64>,
) -> Result<(), String> {
    let sec = "PostgreSQL";
    let Some(admin_url) = postgres_url() else {
        report.row(
            sec,
            "skipped: no server named",
            "set BENCH_POSTGRES_URL (or CHATBRIDGE_TEST_POSTGRES_URL)",
        );
        return Ok(());
    };
    let backend = Backend::Postgres {
        admin_url: admin_url.clone(),
        made: RefCell::default(),
    };
    report.row(
        sec,
        format!("server {}", chatbridge::store::redact_url(&admin_url)),
        backend.describe()?,
    );
    let (peak, one) = load_phases(report, plan, &backend, dir, sample)?;
    let (peak_two, two) = end_to_end(report, plan, &backend, dir, sample, 2)?;
    // BENCH_POSTGRES_QUEUE=0: the load steps alone, for comparing builds
    // quickly (the 1M-queued steps take a minute to fill the database).
    if std::env::var("BENCH_POSTGRES_QUEUE").is_ok_and(|v| v == "0") {
        report.row(
            sec,
            "service peak RSS (VmHWM): load",
            mib(peak.max(peak_two)),
        );
    } else {
        let peak_queue = queue_phases(report, plan, &backend, dir, sample, sample_body)?;
        report.row(
            sec,
            "service peak RSS (VmHWM): load; 1M queued",
            format!("{}; {}", mib(peak.max(peak_two)), mib(peak_queue)),
        );
    }
    if let Some(sqlite) = sqlite_e2e {
        report.target(
            sec,
            "end to end, one instance: PostgreSQL ÷ SQLite",
            format!("{:.2}×", one / sqlite),
            "≥ 0.5×",
            one >= sqlite / 2.0,
        );
    }
    report.target(
        sec,
        "end to end: two instances ÷ one (sharing 2 cores with the database)",
        format!("{:.2}×", two / one),
        "≥ 1×",
        two >= one,
    );
    Ok(())
}

/// The SQLite end to end again with the baseline build's `serve`, right
/// after this build's: both rows, and this build's rate over the baseline's.
fn baseline_end_to_end(
    report: &mut Report,
    plan: &Plan,
    sqlite: &Backend,
    dir: &Path,
    sample: &Value,
    baseline: PathBuf,
    this_rate: f64,
) -> Result<(), String> {
    let copy = dir.join("chatbridge-baseline");
    std::fs::copy(&baseline, &copy).map_err(|e| {
        format!(
            "cannot copy {} (BENCH_BASELINE_BIN): {e}",
            baseline.display()
        )
    })?;
    let sec = "baseline comparison (BENCH_BASELINE_BIN)";
    report.row(sec, "baseline build", baseline.display().to_string());
    *SERVE_BIN.lock().map_err(|e| e.to_string())? = Some(copy);
    let result = end_to_end(report, plan, sqlite, dir, sample, 1);
    *SERVE_BIN.lock().map_err(|e| e.to_string())? = None;
    let (_, base_rate) = result?;
    report.target(
        sec,
        "end to end on SQLite, msg/s: this build ÷ baseline (one run, back to back)",
        format!(
            "{:.2}× ({} ÷ {})",
            this_rate / base_rate,
            thousands(this_rate),
            thousands(base_rate)
        ),
        "≥ 2×",
        this_rate >= 2.0 * base_rate,
    );
    Ok(())
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
    // Set by the load step, read by the postgres step.
    let sqlite_e2e = Cell::new(None);
    let sqlite = Backend::Sqlite { dir: dir.clone() };
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
                let (peak, rate) = load_phases(r, &plan, &sqlite, &dir, &sample)?;
                peak_load = Some(peak);
                sqlite_e2e.set(Some(rate));
                if let Some(baseline) = std::env::var_os("BENCH_BASELINE_BIN") {
                    baseline_end_to_end(r, &plan, &sqlite, &dir, &sample, baseline.into(), rate)?;
                }
                Ok(())
            }),
        ),
        (
            "queue",
            Box::new(|r| {
                peak_big = Some(queue_phases(
                    r,
                    &plan,
                    &sqlite,
                    &dir,
                    &sample,
                    &sample_body,
                )?);
                Ok(())
            }),
        ),
        (
            "postgres",
            Box::new(|r| postgres_phases(r, &plan, &dir, &sample, &sample_body, sqlite_e2e.get())),
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
