//! The log of refused webhooks. Every refusal is worth a WARN line (an
//! order system getting 401 must leave a trace), but a sender stuck in a
//! loop, or a scanner, must not bury the rest of the log: per source and
//! error code at most one line every [`INTERVAL_MS`]; the next line says
//! how many were left out since (`suppressed`). Every refusal is still
//! counted in `chatbridge_webhooks_total` and logged at DEBUG.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use crate::clock::Millis;

/// At most one WARN line per source and code in this span.
pub const INTERVAL_MS: Millis = 10_000;
/// A source name from the URL is the caller's text: log no more of it.
const MAX_SOURCE_CHARS: usize = 64;

/// One refused webhook.
pub struct Refusal<'a> {
    /// The configured source, or "unknown": the key of the rate limit, so
    /// strangers cannot grow the table.
    pub source: &'a str,
    /// The source named in the URL, as the caller wrote it.
    pub requested_source: &'a str,
    pub status: u16,
    pub code: &'static str,
    pub reason: &'a str,
    pub peer: Option<SocketAddr>,
}

#[derive(Default)]
pub struct RefusalLog {
    last: Mutex<HashMap<(String, &'static str), Entry>>,
}

struct Entry {
    logged_at: Millis,
    suppressed: u64,
}

impl RefusalLog {
    /// Logs the refusal; returns how many of its kind the WARN line says
    /// were left out since the last one, or `None` when it made no WARN line.
    pub fn refused(&self, now: Millis, r: Refusal<'_>) -> Option<u64> {
        let requested: String = r.requested_source.chars().take(MAX_SOURCE_CHARS).collect();
        let peer = r.peer.map(|p| p.to_string());
        let suppressed = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            match last.get_mut(&(r.source.to_owned(), r.code)) {
                Some(entry) if now - entry.logged_at < INTERVAL_MS && now >= entry.logged_at => {
                    entry.suppressed += 1;
                    None
                }
                Some(entry) => {
                    let left_out = entry.suppressed;
                    *entry = Entry {
                        logged_at: now,
                        suppressed: 0,
                    };
                    Some(left_out)
                }
                None => {
                    last.insert(
                        (r.source.to_owned(), r.code),
                        Entry {
                            logged_at: now,
                            suppressed: 0,
                        },
                    );
                    Some(0)
                }
            }
        };
        match suppressed {
            // Under the ingest target, where a reader filters for webhooks.
            Some(left_out) => tracing::warn!(
                target: "chatbridge::ingest",
                source = ?requested,
                status = r.status,
                code = r.code,
                reason = r.reason,
                peer,
                suppressed = (left_out > 0).then_some(left_out),
                "webhook refused"
            ),
            None => tracing::debug!(
                target: "chatbridge::ingest",
                source = ?requested,
                status = r.status,
                code = r.code,
                reason = r.reason,
                peer,
                "webhook refused (WARN lines for this source and code are rate-limited)"
            ),
        }
        suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(source: &'static str, code: &'static str) -> Refusal<'static> {
        Refusal {
            source,
            requested_source: source,
            status: 401,
            code,
            reason: "bad signature",
            peer: None,
        }
    }

    #[test]
    fn one_warn_line_per_source_and_code_per_interval_then_the_count_left_out() {
        let log = RefusalLog::default();
        let at = |t| log.refused(t, refusal("oms", "unauthorized"));
        assert_eq!(at(0), Some(0));
        assert_eq!(at(1), None);
        assert_eq!(at(9_999), None);
        // Another code or source has its own line.
        assert_eq!(log.refused(5, refusal("oms", "invalid_json")), Some(0));
        assert_eq!(log.refused(5, refusal("crm", "unauthorized")), Some(0));
        assert_eq!(at(INTERVAL_MS), Some(2));
        assert_eq!(at(INTERVAL_MS + 1), None);
    }
}
