//! The `chatbridge` command line. Parsing only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use chatbridge::admin::cli as admin_cli;
use chatbridge::commands;
use chatbridge::market::fake::{FakeConfig, FakeConfigPatch};

/// mimalloc instead of glibc's malloc: a request allocates and frees many
/// small buffers (HTTP, JSON, rendering, the awc client), and glibc's
/// `malloc`/`free` (with `malloc_consolidate`) took about a fifth of the
/// service's CPU in the load benchmark's profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "chatbridge",
    version,
    about = "Order-system webhooks in, Yandex Market buyer chat messages out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// Folder with chatbridge.toml and routes.toml.
        #[arg(long, default_value = "config")]
        config: PathBuf,
    },
    /// Validate settings, routes and templates; render every route against the sample events.
    Check {
        #[arg(long, default_value = "config")]
        config: PathBuf,
        /// Folder of sample events, one subfolder per source.
        #[arg(long, default_value = "examples/events")]
        examples: PathBuf,
    },
    /// Dry run: which routes match an event and the exact text each would send.
    Render {
        #[arg(long)]
        source: String,
        #[arg(long)]
        event: PathBuf,
        #[arg(long, default_value = "config")]
        config: PathBuf,
    },
    /// A simulated Market Partner API for trials and tests.
    FakeMarket {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: String,
        /// Accepted Api-Key values (repeat the flag); none = any non-empty key.
        #[arg(long = "api-key")]
        api_keys: Vec<String>,
        /// Sends per business per window; 0 = unlimited.
        #[arg(long, default_value_t = 1000)]
        hourly_limit: u32,
        /// chats/new calls (finding the chat of an order or return) per business per window; 0 = unlimited.
        #[arg(long, default_value_t = 1000)]
        chats_new_hourly_limit: u32,
        #[arg(long, default_value_t = 3600)]
        window_secs: u64,
        /// Parallel requests per business before 420; 0 = no cap.
        #[arg(long, default_value_t = 4)]
        max_in_flight: usize,
        /// Share of requests answered 500 (0.0 to 1.0).
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// Inspect and retry deliveries of a running instance (admin API).
    Deliveries {
        #[command(flatten)]
        target: TargetArgs,
        #[command(subcommand)]
        action: DeliveriesAction,
    },
    /// An event by the id its source gave it, with its deliveries.
    Event {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        source: String,
        #[arg(long)]
        event_id: String,
    },
    /// Queue, quota, the Market's pauses and a drain estimate per business of a running instance.
    Queue {
        #[command(flatten)]
        target: TargetArgs,
        /// The admin API's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running instance to reload its configuration.
    Reload {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Print the Standard Webhooks headers for a body, as a sender signs it.
    Sign {
        /// The source's secret (sources.<name>.secret), whsec_...
        #[arg(long, env = "CHATBRIDGE_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// webhook-id (default: a random msg_...). Use a new one per event.
        #[arg(long)]
        id: Option<String>,
        /// webhook-timestamp, Unix seconds (default: now).
        #[arg(long)]
        timestamp: Option<i64>,
        /// The exact body that will be POSTed; - reads stdin.
        file: PathBuf,
    },
    /// Copy the SQLite database consistently while the service runs.
    Backup {
        #[arg(long, default_value = "config")]
        config: PathBuf,
        /// The new file to write (never overwritten).
        #[arg(long)]
        to: PathBuf,
    },
    /// Move the store: copy a SQLite database into PostgreSQL.
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// The bridge and the fake Market in one process: post the samples, print what buyers get.
    Demo {
        #[arg(long, default_value = "config")]
        config: PathBuf,
        #[arg(long, default_value = "examples/events")]
        examples: PathBuf,
    },
}

#[derive(Subcommand)]
enum StoreAction {
    /// Copy every event, delivery, attempt, chat and campaign from a SQLite
    /// database into an empty PostgreSQL one (stop serve first).
    Copy {
        /// The SQLite database: sqlite://path/to/chatbridge.db.
        #[arg(long)]
        from: String,
        /// The PostgreSQL database: postgres://user[:password]@host:port/database.
        #[arg(long, env = "CHATBRIDGE_COPY_TO", hide_env_values = true)]
        to: String,
        /// Go on with an interrupted copy of the same, unchanged file.
        #[arg(long)]
        resume: bool,
        /// Rows per batch; each batch is one transaction.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
    },
}

#[derive(clap::Args)]
struct TargetArgs {
    /// The running chatbridge: http://HOST:PORT (HOST:PORT means http://).
    #[arg(
        long,
        global = true,
        env = "CHATBRIDGE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// The admin token.
    #[arg(
        long,
        global = true,
        env = "CHATBRIDGE__ADMIN__TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

#[derive(clap::Args)]
struct FilterArgs {
    /// queued, sending, delivered, held, dead, failed or cancelled.
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    business: Option<i64>,
    #[arg(long)]
    chat: Option<i64>,
    /// Market order id: deliveries to the chat of this order.
    #[arg(long)]
    order: Option<i64>,
    /// Market return id: deliveries to the chat of this return.
    #[arg(long = "return")]
    return_id: Option<i64>,
    #[arg(long)]
    route: Option<String>,
    #[arg(long)]
    source: Option<String>,
    /// RFC 3339 time: created at or after.
    #[arg(long)]
    since: Option<String>,
    /// RFC 3339 time: created before.
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Subcommand)]
enum DeliveriesAction {
    /// List deliveries, oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Page after this delivery id.
        #[arg(long)]
        after: Option<i64>,
    },
    /// One delivery with its event, text and every attempt.
    Show { id: i64 },
    /// Stop a queued or held delivery.
    Cancel { id: i64 },
    /// Re-render and queue again: one delivery by id, or the failed and dead
    /// ones matching a filter (cancelled ones only with --state cancelled).
    /// Many are previewed first; --yes queues them. Exits 1 if any still fails.
    Retry {
        /// One delivery (failed, dead or cancelled): retried at once.
        #[arg(conflicts_with_all = ["all", "yes"])]
        id: Option<i64>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Every failed and dead delivery (up to --limit, default 100).
        #[arg(long)]
        all: bool,
        /// Do it; without this, only show what would be retried.
        #[arg(long)]
        yes: bool,
    },
}

fn admin_call(target: TargetArgs, run: impl AsyncFnOnce(&admin_cli::Target) -> i32) -> i32 {
    let Some(token) = target.token.filter(|t| !t.is_empty()) else {
        eprintln!("the admin token is needed: pass --token or set CHATBRIDGE__ADMIN__TOKEN");
        return 2;
    };
    let target = match admin_cli::Target::new(&target.url, token) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    actix_rt::System::new().block_on(async move { run(&target).await })
}

/// No filter flag given (`--limit` alone selects nothing).
fn filter_is_empty(f: &FilterArgs) -> bool {
    f.state.is_none()
        && f.business.is_none()
        && f.chat.is_none()
        && f.order.is_none()
        && f.return_id.is_none()
        && f.route.is_none()
        && f.source.is_none()
        && f.since.is_none()
        && f.until.is_none()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Check { config, examples } => commands::check(&config, &examples),
        Command::Render {
            source,
            event,
            config,
        } => commands::render(&config, &source, &event),
        Command::Sign {
            secret,
            id,
            timestamp,
            file,
        } => commands::sign(&secret, id, timestamp, &file),
        Command::Backup { config, to } => commands::backup(&config, &to),
        Command::Store {
            action:
                StoreAction::Copy {
                    from,
                    to,
                    resume,
                    batch,
                },
        } => commands::store_copy(&chatbridge::store::copy::CopyRequest {
            from,
            to,
            resume,
            batch: batch as usize,
        }),
        Command::Serve { config } => actix_rt::System::new().block_on(commands::serve(&config)),
        Command::Demo { config, examples } => {
            actix_rt::System::new().block_on(commands::demo(&config, &examples))
        }
        Command::Deliveries { target, action } => match action {
            DeliveriesAction::List { filter, after } => admin_call(target, async move |t| {
                let query = [
                    ("state", filter.state),
                    ("business_id", filter.business.map(|v| v.to_string())),
                    ("chat_id", filter.chat.map(|v| v.to_string())),
                    ("order_id", filter.order.map(|v| v.to_string())),
                    ("return_id", filter.return_id.map(|v| v.to_string())),
                    ("route", filter.route),
                    ("source", filter.source),
                    ("since", filter.since),
                    ("until", filter.until),
                    ("limit", filter.limit.map(|v| v.to_string())),
                    ("after", after.map(|v| v.to_string())),
                ];
                admin_cli::list(t, &query).await
            }),
            DeliveriesAction::Cancel { id } => {
                admin_call(target, async move |t| admin_cli::cancel(t, id).await)
            }
            DeliveriesAction::Show { id } => {
                admin_call(target, async move |t| admin_cli::show(t, id).await)
            }
            DeliveriesAction::Retry {
                id: Some(id),
                ref filter,
                ..
            } if filter_is_empty(filter) && filter.limit.is_none() => {
                admin_call(target, async move |t| admin_cli::retry_one(t, id).await)
            }
            DeliveriesAction::Retry { id: Some(_), .. } => {
                eprintln!("give a delivery id or a filter, not both");
                2
            }
            DeliveriesAction::Retry {
                id: None,
                filter,
                all,
                yes,
            } => {
                if !all && filter_is_empty(&filter) {
                    eprintln!(
                        "say which deliveries to retry: a delivery id, a filter (--state failed|dead|cancelled, --business, --chat, --order, --return, --route, --source, --since, --until) or --all (every failed and dead one; cancelled ones only with --state cancelled)"
                    );
                    return ExitCode::from(2);
                }
                admin_call(target, async move |t| {
                    let body = serde_json::json!({
                        "state": filter.state, "business_id": filter.business, "chat_id": filter.chat,
                        "order_id": filter.order, "return_id": filter.return_id,
                        "route": filter.route, "source": filter.source, "since": filter.since,
                        "until": filter.until, "limit": filter.limit, "all": all,
                    });
                    admin_cli::retry_many(t, body, yes).await
                })
            }
        },
        Command::Event {
            target,
            source,
            event_id,
        } => admin_call(target, async move |t| {
            admin_cli::event(t, &source, &event_id).await
        }),
        Command::Queue { target, json } => {
            admin_call(target, async move |t| admin_cli::queue(t, json).await)
        }
        Command::Reload { target } => admin_call(target, async |t| admin_cli::reload(t).await),
        Command::FakeMarket {
            listen,
            api_keys,
            hourly_limit,
            chats_new_hourly_limit,
            window_secs,
            max_in_flight,
            failure_rate,
            latency_ms,
        } => {
            let mut config = FakeConfig::default();
            let checked = FakeConfigPatch {
                api_keys: Some(api_keys),
                hourly_limit: Some(hourly_limit),
                chats_new_hourly_limit: Some(chats_new_hourly_limit),
                window_secs: Some(window_secs),
                max_in_flight: Some(max_in_flight),
                failure_rate: Some(failure_rate),
                latency_ms: Some(latency_ms),
                ..FakeConfigPatch::default()
            }
            .apply(&mut config);
            if let Err(problems) = checked {
                problems.iter().for_each(|p| eprintln!("fake-market: {p}"));
                return ExitCode::from(2);
            }
            actix_rt::System::new().block_on(commands::fake_market(&listen, config))
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
