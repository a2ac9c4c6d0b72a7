//! What each Market answer means, in one place, and the retry policy:
//! exponential backoff with jitter, capped, until a maximum age.

use rand::Rng;

use crate::clock::Millis;
use crate::market::client::{MarketAnswer, TransportError};
use crate::settings::DispatchSettings;
use crate::store::ApiErrorEntry;

/// The dispatcher's reading of one answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Delivered,
    /// Worth trying again later (5xx, timeouts, connection errors).
    Retry(String),
    /// 420 (or 429): the Market's limit; wait, this is not a failure.
    Throttle {
        until: Option<Millis>,
    },
    /// The Market refused this message for good (400, 404, other 4xx).
    Refused(String),
    /// 401: the business's key is refused.
    KeyRefused(String),
    /// 403: the key, or only this chat; the dispatcher tells which.
    Forbidden(String),
}

pub fn decide(answer: &Result<MarketAnswer, TransportError>) -> Decision {
    let answer = match answer {
        Ok(a) => a,
        Err(e) => return Decision::Retry(e.to_string()),
    };
    let what = describe(answer.status, &answer.errors);
    match answer.status {
        200..=299 => Decision::Delivered,
        420 | 429 => Decision::Throttle {
            until: answer.until,
        },
        401 => Decision::KeyRefused(what),
        403 => Decision::Forbidden(what),
        408 | 500..=599 => Decision::Retry(what),
        _ => Decision::Refused(what),
    }
}

/// `"400 BAD_REQUEST: chat not found; ..."`: the status with every code and message.
pub fn describe(status: u16, errors: &[ApiErrorEntry]) -> String {
    if errors.is_empty() {
        return format!("Market answered {status}");
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|e| match &e.message {
            Some(m) => format!("{}: {m}", e.code),
            None => e.code.clone(),
        })
        .collect();
    format!("Market answered {status} {}", parts.join("; "))
}

/// Whole seconds are all `X-RateLimit-Resource-Until` says, so the window
/// named `until` ends somewhere in that second: it is surely over one
/// second later. Sending at the named second itself can be up to a
/// second early, and the Market answers that with another 420.
pub fn window_surely_over(until: Millis) -> Millis {
    until + 1000
}

/// How long a 420 (or 429) makes the delivery wait: until the window the
/// Market named is surely over; when that is already behind us (clocks
/// disagree), a short wait, never the long `backoff_ms`, which is only for
/// a 420 that names no time at all.
pub fn throttled_until(until: Option<Millis>, now: Millis, backoff_ms: Millis) -> Millis {
    const SHORT_WAIT_MS: Millis = 1000;
    match until {
        Some(until) if window_surely_over(until) > now => window_surely_over(until),
        Some(_) => now + SHORT_WAIT_MS,
        None => now + backoff_ms,
    }
}

/// When to try again after `attempts` failed attempts, or `None` when the
/// delivery has outlived its maximum age and is dead.
pub fn next_attempt(
    policy: &DispatchSettings,
    attempts: i64,
    queued_at: Millis,
    now: Millis,
) -> Option<Millis> {
    let base = (policy.initial_backoff_secs * 1000) as i64;
    let cap = (policy.max_backoff_secs.max(policy.initial_backoff_secs) * 1000) as i64;
    let exponent = attempts.clamp(0, 30) as u32;
    let delay = base.saturating_mul(1i64 << exponent).min(cap);
    // Equal jitter: at least half the delay, so retries stay spread out
    // without ever coming back sooner than half the schedule.
    let jittered = delay / 2 + rand::thread_rng().gen_range(0..=delay / 2);
    let at = now + jittered;
    (at <= queued_at + (policy.max_age_secs * 1000) as i64).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_ends_at_max_age() {
        let policy = DispatchSettings {
            initial_backoff_secs: 10,
            max_backoff_secs: 60,
            max_age_secs: 3600,
            ..DispatchSettings::default()
        };
        for (attempts, low, high) in [
            (0, 5_000, 10_000),
            (1, 10_000, 20_000),
            (3, 30_000, 60_000),
            (10, 30_000, 60_000),
        ] {
            let at = next_attempt(&policy, attempts, 0, 0).unwrap();
            assert!((low..=high).contains(&at), "attempt {attempts}: {at}");
        }
        assert_eq!(next_attempt(&policy, 0, 0, 3_600_000), None);
    }

    #[test]
    fn a_420_waits_past_the_named_second_and_never_the_long_backoff_when_it_named_a_time() {
        let backoff = 60_000;
        // The window ends somewhere in the named second: wait past it.
        assert_eq!(throttled_until(Some(10_000), 9_000, backoff), 11_000);
        assert_eq!(throttled_until(Some(10_000), 10_500, backoff), 11_000);
        // A named time already behind us: a short wait, not the backoff.
        assert_eq!(throttled_until(Some(10_000), 25_000, backoff), 26_000);
        // No time named: the configured backoff.
        assert_eq!(throttled_until(None, 25_000, backoff), 85_000);
    }

    #[test]
    fn statuses_map_to_decisions() {
        let answer = |status| {
            Ok(MarketAnswer {
                status,
                errors: vec![],
                remaining: None,
                until: None,
                latency: std::time::Duration::ZERO,
                chat_id: None,
            })
        };
        assert_eq!(decide(&answer(200)), Decision::Delivered);
        assert!(matches!(decide(&answer(400)), Decision::Refused(_)));
        assert!(matches!(decide(&answer(404)), Decision::Refused(_)));
        assert!(matches!(decide(&answer(401)), Decision::KeyRefused(_)));
        assert!(matches!(decide(&answer(403)), Decision::Forbidden(_)));
        assert!(matches!(decide(&answer(420)), Decision::Throttle { .. }));
        assert!(matches!(decide(&answer(503)), Decision::Retry(_)));
        assert!(matches!(
            decide(&Err(TransportError::Timeout(
                std::time::Duration::from_secs(1)
            ))),
            Decision::Retry(_)
        ));
    }
}
