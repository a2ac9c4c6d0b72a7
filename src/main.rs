//! The `chatbridge` command line. Parsing only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use chatbridge::commands;
use chatbridge::market::fake::FakeConfig;

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
    /// The bridge and the fake Market in one process: post the samples, print what buyers get.
    Demo {
        #[arg(long, default_value = "config")]
        config: PathBuf,
        #[arg(long, default_value = "examples/events")]
        examples: PathBuf,
    },
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
        Command::Serve { config } => actix_rt::System::new().block_on(commands::serve(&config)),
        Command::Demo { config, examples } => {
            actix_rt::System::new().block_on(commands::demo(&config, &examples))
        }
        Command::FakeMarket {
            listen,
            api_keys,
            hourly_limit,
            window_secs,
            max_in_flight,
            failure_rate,
            latency_ms,
        } => {
            let config = FakeConfig {
                api_keys,
                hourly_limit,
                window_secs,
                max_in_flight,
                failure_rate,
                latency_ms,
            };
            actix_rt::System::new().block_on(commands::fake_market(&listen, config))
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
