//! The command-line verbs behind `main.rs`: `check`, `render`, `demo`,
//! `serve` and `fake-market`. Each returns its exit status; output for
//! people goes to stdout, logs to stderr.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::Value;

use crate::app::{Application, BuildOptions};
use crate::clock::{to_rfc3339, Clock, SystemClock};
use crate::market::fake::{FakeConfig, FakeMarket};
use crate::pipeline::Pipeline;
use crate::render::EventMeta;
use crate::settings::{Settings, SourceSettings};

/// A sample event file and what it holds.
pub struct SampleEvent {
    pub source: String,
    pub file: PathBuf,
    pub body: String,
    pub payload: Value,
}

/// Reads `examples/<source>/*.json` for every configured source.
pub fn sample_events(settings: &Settings, examples: &Path) -> (Vec<SampleEvent>, Vec<String>) {
    let mut events = Vec::new();
    let mut problems = Vec::new();
    for source in settings.sources.keys() {
        let dir = examples.join(source);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for file in files {
            let body = match std::fs::read_to_string(&file) {
                Ok(b) => b,
                Err(e) => {
                    problems.push(format!("{}: cannot read: {e}", file.display()));
                    continue;
                }
            };
            match serde_json::from_str::<Value>(&body) {
                Ok(payload) => events.push(SampleEvent {
                    source: source.clone(),
                    file,
                    body,
                    payload,
                }),
                Err(e) => problems.push(format!("{}: not valid JSON: {e}", file.display())),
            }
        }
    }
    (events, problems)
}

fn meta_for(
    source: &SourceSettings,
    name: &str,
    payload: &Value,
    now: i64,
) -> Result<EventMeta, String> {
    let event_type = payload
        .pointer(source.event_type_pointer())
        .and_then(Value::as_str)
        .ok_or_else(|| {
            format!(
                "no event type (a string) at {:?}",
                source.event_type_pointer()
            )
        })?;
    let id = source
        .event_id
        .as_deref()
        .and_then(|p| payload.pointer(p))
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string())
        })
        .unwrap_or_else(|| "sample".into());
    // A notification's own business, if it names one; a campaign's is
    // filled in from [market.campaigns] by the pipeline.
    let business_id = (source.kind == crate::settings::SourceKind::Market)
        .then(|| payload.get("businessId").and_then(Value::as_i64))
        .flatten();
    Ok(EventMeta {
        source: name.to_owned(),
        event_type: event_type.to_owned(),
        id,
        received_at: to_rfc3339(now),
        business_id,
    })
}

/// The business a check or dry run renders a Market notification for when
/// its campaign is not in `[market.campaigns]`: `serve` asks the Market,
/// which an offline command cannot. Returns the note to print, once per
/// campaign.
const STAND_IN_BUSINESS: i64 = 1;

fn stand_in_business(
    pipeline: &Pipeline,
    source: &SourceSettings,
    payload: &Value,
    meta: &mut EventMeta,
) -> Option<String> {
    let campaign = payload.get("campaignId").and_then(Value::as_i64)?;
    if source.kind != crate::settings::SourceKind::Market
        || meta.business_id.is_some()
        || pipeline
            .settings
            .market
            .configured_campaign(campaign)
            .is_some()
    {
        return None;
    }
    meta.business_id = Some(STAND_IN_BUSINESS);
    Some(format!(
        "campaign {campaign} is not in [market.campaigns]: serve asks the Market for its business \
         (GET /v2/campaigns/{campaign}); rendered here for business {STAND_IN_BUSINESS} as a stand-in"
    ))
}

/// `chatbridge check`: validate everything and render every route against
/// the sample events. Problems print as `file: what is wrong`.
pub fn check(config_dir: &Path, examples: &Path) -> i32 {
    let pipeline = match Pipeline::load(config_dir) {
        Ok(p) => p,
        Err(problems) => {
            for p in &problems {
                println!("{p}");
            }
            println!("{} problem(s) found", problems.len());
            return 1;
        }
    };
    if !examples.is_dir() {
        println!(
            "{}: examples folder not found (pass --examples DIR: a folder with one subfolder of *.json sample events per source)",
            examples.display()
        );
        println!("1 problem(s) found");
        return 1;
    }
    let (events, mut problems) = sample_events(&pipeline.settings, examples);
    let mut warnings = unknown_sample_folders(&pipeline.settings, examples);
    let now = SystemClock.now_ms();
    let mut used_routes = std::collections::HashSet::new();
    let mut rendered = 0;
    let mut notes: Vec<String> = Vec::new();
    for sample in &events {
        let source = &pipeline.settings.sources[&sample.source];
        let mut meta = match meta_for(source, &sample.source, &sample.payload, now) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("{}: {e}", sample.file.display()));
                continue;
            }
        };
        if let Some(note) = stand_in_business(&pipeline, source, &sample.payload, &mut meta) {
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
        let planned = pipeline.plan(&sample.payload, &meta);
        // Not a failure: a sample may show an event that rightly sends
        // nothing. But it is most often a typo in a route, so say it.
        if planned.is_empty() {
            warnings.push(format!(
                "{}: event {:?} from source {:?} matches no route; such a webhook is stored and answered 202 with no deliveries",
                sample.file.display(),
                meta.event_type,
                sample.source
            ));
        }
        for planned in planned {
            used_routes.insert(planned.route.clone());
            match planned.rendered {
                Ok(_) => rendered += 1,
                Err(e) => problems.push(format!(
                    "{}: route {:?}: {e}",
                    sample.file.display(),
                    planned.route
                )),
            }
        }
    }
    for route in &pipeline.routes.routes {
        if !used_routes.contains(&route.name) {
            problems.push(format!(
                "{}: route {:?} (event {:?}) matches none of the sample events; add one under {}/<source>/ or fix the pattern",
                pipeline.settings.routes_file().display(),
                route.name,
                route.event,
                examples.display()
            ));
        }
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    for p in &problems {
        println!("{p}");
    }
    if problems.is_empty() {
        println!(
            "ok: {} route(s), {} template(s), {} sample event(s), {} message(s) rendered{}",
            pipeline.routes.routes.len(),
            pipeline.renderer.template_names().count(),
            events.len(),
            rendered,
            match warnings.len() {
                0 => String::new(),
                n => format!(", {n} warning(s)"),
            }
        );
        for n in &notes {
            println!("note: {n}");
        }
        0
    } else {
        println!("{} problem(s) found", problems.len());
        1
    }
}

/// Subfolders of the examples folder that name no configured source: their
/// samples are neither checked nor posted by the demo.
fn unknown_sample_folders(settings: &Settings, examples: &Path) -> Vec<String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(examples)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    found
        .into_iter()
        .filter_map(|dir| {
            let name = dir.file_name()?.to_str()?.to_owned();
            (!settings.sources.contains_key(&name)).then(|| {
                format!(
                    "{}: no source {name:?} in {}, so these samples are not checked",
                    dir.display(),
                    settings.settings_file().display()
                )
            })
        })
        .collect()
}

/// `chatbridge render`: which routes match the event and the exact text.
pub fn render(config_dir: &Path, source: &str, event_file: &Path) -> i32 {
    let pipeline = match Pipeline::load(config_dir) {
        Ok(p) => p,
        Err(problems) => {
            problems.iter().for_each(|p| println!("{p}"));
            return 1;
        }
    };
    let Some(source_settings) = pipeline.settings.sources.get(source) else {
        println!(
            "{}: no source {source:?} (known: {})",
            pipeline.settings.settings_file().display(),
            pipeline
                .settings
                .sources
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        return 1;
    };
    let payload = match std::fs::read_to_string(event_file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_str::<Value>(&b).map_err(|e| format!("not valid JSON: {e}")))
    {
        Ok(p) => p,
        Err(e) => {
            println!("{}: {e}", event_file.display());
            return 1;
        }
    };
    let mut meta = match meta_for(source_settings, source, &payload, SystemClock.now_ms()) {
        Ok(m) => m,
        Err(e) => {
            println!("{}: {e}", event_file.display());
            return 1;
        }
    };
    if let Some(note) = stand_in_business(&pipeline, source_settings, &payload, &mut meta) {
        println!("note: {note}\n");
    }
    let planned = pipeline.plan(&payload, &meta);
    if planned.is_empty() {
        println!(
            "no route matches event {:?} from source {source:?}",
            meta.event_type
        );
        return 0;
    }
    let mut status = 0;
    for p in planned {
        match p.rendered {
            Ok(r) => println!(
                "route {:?} → business {}, {}, {} characters:\n{}",
                p.route,
                r.business_id,
                r.target,
                r.text.as_str().chars().count(),
                show_text(r.text.as_str())
            ),
            Err(e) => {
                println!("route {:?}: cannot render: {e}\n", p.route);
                status = 1;
            }
        }
    }
    status
}

/// The text as `render` prints it: a trailing line break, which the buyer
/// gets too but a terminal hides, is shown as `⏎` and said in a note.
fn show_text(text: &str) -> String {
    let body = text.trim_end_matches('\n');
    let breaks = text.len() - body.len();
    if breaks == 0 {
        return format!("{text}\n");
    }
    format!(
        "{body}{}(the text ends with {breaks} line break(s), shown as ⏎; the buyer gets them too)\n",
        "⏎\n".repeat(breaks)
    )
}

/// `chatbridge serve`.
pub async fn serve(config_dir: &Path) -> i32 {
    let pipeline = match Pipeline::load(config_dir) {
        Ok(p) => p,
        Err(problems) => {
            problems.iter().for_each(|p| eprintln!("{p}"));
            return 1;
        }
    };
    crate::telemetry::init(pipeline.settings.log.format);
    if pipeline
        .settings
        .market
        .api_key
        .as_ref()
        .is_none_or(|k| k.expose_secret().is_empty())
        && pipeline
            .settings
            .market
            .businesses
            .values()
            .all(|b| b.api_key.is_none())
    {
        tracing::warn!("no Market API key is set (CHATBRIDGE__MARKET__API_KEY): deliveries will be held until one is");
    }
    let version = pipeline.version.clone();
    let app = match Application::build(
        pipeline,
        BuildOptions {
            clock: Arc::new(SystemClock),
            handle_signals: true,
            loader: None,
        },
    ) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("{e:#}");
            return 1;
        }
    };
    tracing::info!(listen = %app.addr(), config_version = %version, "chatbridge is serving");
    match app.run_until_stopped().await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("server error: {e}");
            1
        }
    }
}

/// `chatbridge fake-market`: serves until Ctrl-C.
pub async fn fake_market(listen: &str, config: FakeConfig) -> i32 {
    crate::telemetry::init(crate::settings::LogFormat::Text);
    let market = match FakeMarket::start(listen, config, Arc::new(SystemClock)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return 1;
        }
    };
    println!(
        "fake Market listening on {} (received messages: GET {}/_fake/messages)",
        market.base_url(),
        market.base_url()
    );
    let _ = tokio::signal::ctrl_c().await;
    market.stop().await;
    0
}

/// Posts a sample event as its source would: signed, or with its token.
pub async fn post_sample(
    client: &awc::Client,
    base: &str,
    source: &SourceSettings,
    sample: &SampleEvent,
    now_secs: i64,
    id: &str,
) -> Result<(u16, Value), String> {
    let mut request = client
        .post(format!("{base}/hooks/{}", sample.source))
        .insert_header(("content-type", "application/json"));
    if let Some(secret) = source.secret.as_ref().and_then(|s| s.0.first()) {
        let signature = crate::ingest::signature::sign(
            secret.expose_secret(),
            id,
            now_secs,
            sample.body.as_bytes(),
        )?;
        request = request
            .insert_header(("webhook-id", id))
            .insert_header(("webhook-timestamp", now_secs.to_string()))
            .insert_header(("webhook-signature", signature));
    } else if let Some(token) = source.token.as_ref().and_then(|t| t.0.first()) {
        request =
            request.insert_header(("authorization", format!("Bearer {}", token.expose_secret())));
    }
    let mut response = request
        .send_body(sample.body.clone())
        .await
        .map_err(|e| e.to_string())?;
    let body = response.json::<Value>().await.map_err(|e| e.to_string())?;
    Ok((response.status().as_u16(), body))
}

/// The campaign of the sample notifications, and the business the demo's
/// fake Market says it belongs to.
const DEMO_CAMPAIGN: i64 = 21_000_001;
const DEMO_BUSINESS: i64 = 111;

/// `chatbridge demo`: the bridge and a fake Market in one process, on a
/// fresh temporary database; posts the sample events and prints what the
/// buyers got.
pub async fn demo(config_dir: &Path, examples: &Path) -> i32 {
    match run_demo(config_dir, examples).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            1
        }
    }
}

async fn run_demo(config_dir: &Path, examples: &Path) -> anyhow::Result<i32> {
    crate::telemetry::init(crate::settings::LogFormat::Text);
    let mut settings = Settings::load(config_dir)?;
    let temp = tempfile::tempdir()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // The fake knows the sample notifications' campaign, so the demo shows
    // chatbridge learning its business from GET /v2/campaigns/{id}.
    let fake = FakeConfig {
        campaigns: [(DEMO_CAMPAIGN.to_string(), DEMO_BUSINESS)].into(),
        ..FakeConfig::default()
    };
    let market = FakeMarket::start("127.0.0.1:0", fake, clock.clone())?;
    settings.storage.url = format!("sqlite://{}", temp.path().join("demo.db").display());
    settings.market.base_url = market.base_url();
    settings.market.api_key = Some("demo-api-key".to_owned().into());
    settings.server.listen = "127.0.0.1:0".into();
    settings.server.watch_config = false;
    // The Market's notifications come from its own ranges; here from the
    // fake's notifier, on loopback.
    for source in settings.sources.values_mut() {
        if source.kind == crate::settings::SourceKind::Market {
            source.allow_from = vec!["127.0.0.1/32".into(), "::1/128".into()];
        }
    }
    let pipeline = Pipeline::from_settings(settings).map_err(|p| anyhow::anyhow!(p.join("\n")))?;
    let (samples, problems) = sample_events(&pipeline.settings, examples);
    for p in &problems {
        println!("skipped {p}");
    }
    let sources = pipeline.settings.sources.clone();
    // How many messages each Market sample should give: its answer is the
    // spec's 200, which does not list deliveries.
    let market_routes: Vec<usize> = samples
        .iter()
        .map(|sample| {
            let source = &sources[&sample.source];
            if source.kind != crate::settings::SourceKind::Market {
                return 0;
            }
            meta_for(source, &sample.source, &sample.payload, clock.now_ms())
                .map(|mut meta| {
                    meta.business_id = Some(DEMO_BUSINESS);
                    pipeline
                        .plan(&sample.payload, &meta)
                        .iter()
                        .filter(|p| p.rendered.is_ok())
                        .count()
                })
                .unwrap_or(0)
        })
        .collect();
    let app = Application::build(
        pipeline,
        BuildOptions {
            clock: clock.clone(),
            handle_signals: false,
            loader: None,
        },
    )?;
    let base = format!("http://{}", app.addr());
    let handle = app.handle();
    let server = actix_rt::spawn(app.run_until_stopped());
    println!(
        "chatbridge on {base}, fake Market on {}, database in {}\n",
        market.base_url(),
        temp.path().display()
    );

    let client = awc::Client::default();
    let mut expected = 0;
    for (i, sample) in samples.iter().enumerate() {
        if sources[&sample.source].kind == crate::settings::SourceKind::Market {
            let url = format!("{base}/hooks/{}", sample.source);
            let answers = crate::market::fake::notifier::push(&url, &sample.payload, 1).await;
            let answer = answers.first().map(|a| a.status.unwrap_or(0)).unwrap_or(0);
            println!(
                "the Market notifies POST /hooks/{}/notification {} → {answer}",
                sample.source,
                sample.file.display(),
            );
            expected += market_routes.get(i).copied().unwrap_or(0);
            continue;
        }
        let id = format!("demo-{}-{i}", clock.now_ms());
        let (status, body) = post_sample(
            &client,
            &base,
            &sources[&sample.source],
            sample,
            clock.now_ms() / 1000,
            &id,
        )
        .await
        .map_err(|e| anyhow::anyhow!("posting {}: {e}", sample.file.display()))?;
        let deliveries = body["deliveries"].as_array().cloned().unwrap_or_default();
        println!(
            "POST /hooks/{} {} → {status}, {} deliver(y/ies)",
            sample.source,
            sample.file.display(),
            deliveries.len()
        );
        for d in &deliveries {
            if d["state"] == "failed" {
                println!(
                    "   delivery {} (route {}) failed to render",
                    d["id"], d["route"]
                );
            } else {
                expected += 1;
            }
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while market.delivered().len() < expected && std::time::Instant::now() < deadline {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    println!();
    let delivered = market.delivered();
    // Chats chatbridge found by order or return, to say so beside them.
    let found: std::collections::HashMap<i64, (String, i64)> = market
        .requests_of(crate::market::fake::FakeMethod::CreateChat)
        .into_iter()
        .filter_map(|r| Some((r.chat_id, r.context?)))
        .collect();
    for m in &delivered {
        let how = match found.get(&m.chat_id) {
            Some((kind, id)) => format!(
                " (the chat of {} {id}, found with chats/new)",
                kind.to_lowercase()
            ),
            None => String::new(),
        };
        println!(
            "── business {}, chat {}{how} ──\n{}\n",
            m.business_id, m.chat_id, m.message
        );
    }
    println!(
        "{} of {} message(s) delivered to the fake Market",
        delivered.len(),
        expected
    );
    handle.stop(true).await;
    let _ = server.await;
    market.stop().await;
    Ok(if delivered.len() == expected { 0 } else { 1 })
}

/// `chatbridge sign`: the Standard Webhooks headers a sender puts on
/// `body` (the exact bytes it will POST), signed with the source's secret,
/// one `name: value` line each, ready for `curl -H @file`.
pub fn sign(secret: &str, id: Option<String>, timestamp: Option<i64>, body_file: &Path) -> i32 {
    let body = if body_file == Path::new("-") {
        let mut buf = Vec::new();
        match std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf) {
            Ok(_) => buf,
            Err(e) => {
                eprintln!("cannot read the body from stdin: {e}");
                return 1;
            }
        }
    } else {
        match std::fs::read(body_file) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cannot read {}: {e}", body_file.display());
                return 1;
            }
        }
    };
    let id = id.unwrap_or_else(|| format!("msg_{:016x}", rand::random::<u64>()));
    let timestamp = timestamp.unwrap_or_else(|| SystemClock.now_ms() / 1000);
    match crate::ingest::signature::sign(secret, &id, timestamp, &body) {
        Ok(signature) => {
            println!("webhook-id: {id}");
            println!("webhook-timestamp: {timestamp}");
            println!("webhook-signature: {signature}");
            0
        }
        Err(e) => {
            eprintln!("--secret: {e}");
            2
        }
    }
}

/// `chatbridge backup --to FILE`: a consistent copy of the SQLite database
/// while the service runs (`VACUUM INTO` reads one snapshot, so writes may
/// go on; the copy is compact and holds no WAL), checked before it is
/// called done.
/// `chatbridge store copy`: the whole SQLite store into PostgreSQL (see
/// `store::copy`). Progress on stderr, the summary on stdout. Exit 0 when
/// every row is there; 1 when the copy failed part-way (rerun with
/// `--resume`); 2 when it was refused or the command line is wrong.
pub fn store_copy(request: &crate::store::copy::CopyRequest) -> i32 {
    use crate::store::copy::{copy, CopyError};
    let from = crate::store::redact_url(&request.from);
    let to = crate::store::redact_url(&request.to);
    let mut progress = |line: &str| eprintln!("store copy: {line}");
    match copy(request, &mut progress) {
        Ok(summary) => {
            if summary.already_done {
                println!("{from} was already copied to {to}; nothing written. The target holds:");
            } else {
                println!("copied {from} to {to}:");
            }
            for t in &summary.tables {
                println!(
                    "  {:<17} {:>10} rows ({} written by this run)",
                    t.table.name(),
                    t.rows,
                    t.copied
                );
            }
            if !summary.already_done {
                println!(
                    "  quota slots       {:>10} (the Market calls that count for the hourly quota)",
                    summary.quota_slots
                );
                if summary.requeued > 0 {
                    println!(
                        "  {} delivery(ies) were `sending` when the SQLite process stopped: queued again \
                         (the Market may have had them; at-least-once)",
                        summary.requeued
                    );
                }
                println!(
                    "next: set storage.url to the PostgreSQL database and start serve (see README, \
                     \"Moving from SQLite to PostgreSQL\")"
                );
            }
            0
        }
        Err(e) => {
            eprintln!("store copy: {e}");
            match e {
                CopyError::Failed(_) => 1,
                CopyError::Usage(_) | CopyError::Refused(_) => 2,
            }
        }
    }
}

pub fn backup(config_dir: &Path, to: &Path) -> i32 {
    match run_backup(config_dir, to) {
        Ok(size) => {
            println!("backed up to {} ({size} bytes)", to.display());
            0
        }
        Err(e) => {
            eprintln!("backup failed: {e}");
            1
        }
    }
}

fn run_backup(config_dir: &Path, to: &Path) -> Result<u64, String> {
    let settings = Settings::load(config_dir).map_err(|e| e.to_string())?;
    let url = &settings.storage.url;
    let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return Err(format!(
            "storage.url {url:?} is not a SQLite database; only sqlite:// can be backed up with this command"
        ));
    };
    if !Path::new(path).exists() {
        return Err(format!(
            "no database at {path} (storage.url in {}); run from the folder chatbridge serve runs in, or pass --config",
            settings.settings_file().display()
        ));
    }
    if to.exists() {
        return Err(format!(
            "{} exists; give a new file (a backup never overwrites)",
            to.display()
        ));
    }
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot open {path}: {e}"))?;
    conn.busy_timeout(Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    let target = to
        .to_str()
        .ok_or_else(|| format!("{}: the path must be UTF-8", to.display()))?;
    conn.execute("VACUUM INTO ?1", [target])
        .map_err(|e| format!("copying {path} to {}: {e}", to.display()))?;
    let copy =
        rusqlite::Connection::open_with_flags(target, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("cannot open the copy {}: {e}", to.display()))?;
    let check: String = copy
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| format!("checking the copy {}: {e}", to.display()))?;
    if check != "ok" {
        return Err(format!(
            "the copy {} fails its check: {check}",
            to.display()
        ));
    }
    std::fs::metadata(to)
        .map(|m| m.len())
        .map_err(|e| e.to_string())
}
