//! Plan (what each step runs, full or quick), the report table and the number formatting.

use super::*;

pub(crate) struct Plan {
    pub(crate) quick: bool,
    pub(crate) fsync_writes: usize,
    pub(crate) render_secs: f64,
    pub(crate) ingest_secs: f64,
    pub(crate) ingest_max: u64,
    pub(crate) drain_secs: f64,
    pub(crate) e2e_secs: f64,
    pub(crate) e2e_max: u64,
    pub(crate) e2e_wait_secs: f64,
    pub(crate) scale_iters: usize,
    pub(crate) scale_secs: f64,
    pub(crate) first_delivery_secs: f64,
    pub(crate) big_queue: usize,
    pub(crate) small_queue: usize,
    pub(crate) rss_posts: u64,
}

impl Plan {
    pub(crate) fn new(quick: bool) -> Self {
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

pub(crate) struct Row {
    pub(crate) section: String,
    pub(crate) metric: String,
    pub(crate) value: String,
    pub(crate) target: String,
    pub(crate) ok: Option<bool>,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    /// Correctness failures: the run is invalid, exit 1.
    pub(crate) failures: Vec<String>,
}

impl Report {
    pub(crate) fn row(
        &mut self,
        section: impl Into<String>,
        metric: impl Into<String>,
        value: impl Into<String>,
    ) {
        self.rows.push(Row {
            section: section.into(),
            metric: metric.into(),
            value: value.into(),
            target: String::new(),
            ok: None,
        });
    }

    pub(crate) fn target(
        &mut self,
        section: impl Into<String>,
        metric: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        ok: bool,
    ) {
        self.rows.push(Row {
            section: section.into(),
            metric: metric.into(),
            value: value.into(),
            target: target.into(),
            ok: Some(ok),
        });
    }

    pub(crate) fn fail(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("[bench] FAILURE: {what}");
        self.failures.push(what);
    }

    pub(crate) fn print(&self) {
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
        let mut sections: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !sections.contains(&r.section.as_str()) {
                sections.push(&r.section);
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

pub(crate) fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    format!("{s}{}", " ".repeat(width.saturating_sub(n)))
}

pub(crate) fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

pub(crate) fn thousands(n: f64) -> String {
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

pub(crate) fn ms(us: f64) -> String {
    if us >= 100_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.0} µs", us)
    }
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn pct(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ───────────────────────── processes ─────────────────────────
