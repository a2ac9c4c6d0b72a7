//! Logging through `tracing`: human-readable by default, JSON when
//! `log.format = "json"`; levels from `RUST_LOG` (default `info`). Text is
//! coloured only when stderr is a terminal and `NO_COLOR` is unset, so log
//! files and journald get no escape codes.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    // A second init (tests, the demo) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Colour on a terminal only, unless `NO_COLOR` is set to anything but
/// the empty string (<https://no-color.org>).
fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

mod gauges;
mod metrics;
mod refusals;
pub use gauges::{QueueGaugeSource, RefresherHandle};
pub use metrics::Metrics;
pub use refusals::{Refusal, RefusalLog, INTERVAL_MS as REFUSAL_LOG_INTERVAL_MS};

#[cfg(test)]
mod tests {
    use super::use_colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        assert!(use_colour(true, None));
        assert!(!use_colour(false, None));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(use_colour(true, Some(OsStr::new(""))));
    }
}
