//! The dispatcher: takes due deliveries from the store and sends them to
//! the Market, one business at a time within its limits.
//!
//! Guarantees:
//! - at-least-once: a delivery is leased (`sending`) before its request
//!   and recorded after the answer; a crash in between repeats at most
//!   that one message once its lease expires (the Market has no
//!   idempotency key);
//! - per business, never more than `hourly_limit` sends in any window of
//!   `quota_window_secs` (counted from the store at start) and never more
//!   than `max_in_flight` requests at once (a semaphore per business);
//! - per chat, messages go in the order their events were accepted: a
//!   delivery is claimed only when no earlier one of its chat is open;
//! - every answer maps to one state (see `retry::decide`): 200 delivered;
//!   400/404 dead; 401 (or 403 on several chats) held, probed every
//!   `held_retry_secs`; 420 waits for the window, not counted as an
//!   attempt; 5xx and transport errors retried with capped, jittered
//!   backoff until `max_age_secs`, then dead.
//! - errors of the store or the API never make it spin: every loop waits.
//!
//! awc's client is `!Send`, so the dispatcher runs on one actix thread and
//! shares its state through `Rc`.

pub mod quota;
pub mod retry;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::clock::{Millis, SharedClock};
use crate::domain::{BusinessId, ChatId};
use crate::market::client::{MarketClient, TransportError};
use crate::pipeline::Pipeline;
use crate::store::{Attempt, Claimed, Store, StoreError, Verdict};
use crate::telemetry::Metrics;
use quota::QuotaLog;
use retry::{decide, next_attempt, Decision};

/// Real-time cap on any wait, so a stuck clock or a lost wake-up costs at most this.
const MAX_IDLE: Duration = Duration::from_millis(500);
/// Shortest time between two rounds started by wake-ups.
const MIN_ROUND_GAP: Duration = Duration::from_millis(2);
/// A 403 on another chat within this span means the key, not the chat, is refused.
const FORBIDDEN_MEMORY_MS: Millis = 3_600_000;

pub struct DispatcherHandle {
    shutdown: watch::Sender<bool>,
    finished: tokio::sync::oneshot::Receiver<()>,
}

impl DispatcherHandle {
    /// Stops claiming now; in-flight sends get the settings' shutdown
    /// timeout from this moment, then the rest goes back to the queue.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Stops (if not yet) and waits until the dispatcher is done.
    pub async fn shutdown(self) {
        self.stop();
        let _ = self.finished.await;
    }
}

struct Business {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    quota: QuotaLog,
    /// The Market said its window is used up (420 or Remaining: 0).
    blocked_until: Millis,
    held: bool,
    next_probe_at: Millis,
    forbidden_chats: Vec<(ChatId, Millis)>,
}

struct Shared {
    store: Arc<dyn Store>,
    pipeline: Arc<ArcSwap<Pipeline>>,
    clock: SharedClock,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    client: MarketClient,
    /// The configuration version last seen; a new one re-probes held businesses.
    seen_version: RefCell<String>,
    businesses: RefCell<HashMap<BusinessId, Business>>,
    in_flight: RefCell<HashSet<i64>>,
    idle: Notify,
}

/// Starts the dispatcher on the current actix thread.
pub fn spawn(
    store: Arc<dyn Store>,
    pipeline: Arc<ArcSwap<Pipeline>>,
    clock: SharedClock,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
) -> DispatcherHandle {
    let settings = &pipeline.load().settings;
    let client = MarketClient::new(
        &settings.market.base_url,
        Duration::from_secs(settings.market.request_timeout_secs),
    );
    let shared = Rc::new(Shared {
        store,
        pipeline: pipeline.clone(),
        clock,
        wake,
        metrics,
        client,
        seen_version: RefCell::new(pipeline.load().version.clone()),
        businesses: RefCell::default(),
        in_flight: RefCell::default(),
        idle: Notify::new(),
    });
    let (shutdown, stop) = watch::channel(false);
    let (done, finished) = tokio::sync::oneshot::channel();
    actix_rt::spawn(async move {
        run(shared, stop).await;
        let _ = done.send(());
    });
    DispatcherHandle { shutdown, finished }
}

async fn run(shared: Rc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut next_reclaim = 0;
    let mut failures = 0u32;
    if let Ok(held) = shared.store.held_businesses().await {
        for business in held {
            if ensure_business(&shared, business).await.is_ok() {
                if let Some(b) = shared.businesses.borrow_mut().get_mut(&business) {
                    b.held = true;
                }
            }
        }
    }
    while !*stop.borrow() {
        let now = shared.clock.now_ms();
        let round_started = std::time::Instant::now();
        let wake_at = match round(&shared, now, &mut next_reclaim).await {
            Ok(at) => {
                failures = 0;
                at
            }
            Err(e) => {
                failures += 1;
                let wait = 100u64.saturating_mul(1 << failures.min(8)).min(30_000);
                tracing::error!(error = %e, retry_in_ms = wait, "dispatcher cannot reach the store");
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
        };
        if wake_at <= now {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = async {
                shared.wake.notified().await;
                // Many wake-ups (one per webhook, one per finished send)
                // make one round: at most one per MIN_ROUND_GAP.
                tokio::time::sleep(MIN_ROUND_GAP.saturating_sub(round_started.elapsed())).await;
            } => {}
            _ = async {
                if wake_at == Millis::MAX {
                    std::future::pending::<()>().await
                } else {
                    shared.clock.sleep_until(wake_at).await
                }
            } => {}
            _ = tokio::time::sleep(MAX_IDLE) => {}
            _ = stop.changed() => {}
        }
    }
    drain(&shared).await;
}

/// Waits for in-flight sends, then gives back what is still leased.
async fn drain(shared: &Rc<Shared>) {
    let timeout = Duration::from_secs(shared.pipeline.load().settings.server.shutdown_timeout_secs);
    let finished = tokio::time::timeout(timeout, async {
        while !shared.in_flight.borrow().is_empty() {
            shared.idle.notified().await;
        }
    })
    .await;
    let left: Vec<i64> = shared.in_flight.borrow().iter().copied().collect();
    if finished.is_err() && !left.is_empty() {
        tracing::warn!(
            count = left.len(),
            "sends still in flight at shutdown; returning them to the queue"
        );
        if let Err(e) = shared.store.release(left, shared.clock.now_ms()).await {
            tracing::error!(error = %e, "could not return in-flight deliveries; their leases will expire");
        }
    }
}

async fn ensure_business(shared: &Rc<Shared>, business: BusinessId) -> Result<(), StoreError> {
    let limits = shared.pipeline.load().settings.market.limits_for(business);
    let window_ms = limits.quota_window.as_millis() as Millis;
    if let Some(b) = shared.businesses.borrow_mut().get_mut(&business) {
        // Settings may have changed since (a reload); follow them.
        b.quota.set_limits(limits.hourly_limit, window_ms);
        if b.max_in_flight != limits.max_in_flight {
            let in_use = b.max_in_flight - b.permits.available_permits();
            b.permits = Arc::new(Semaphore::new(limits.max_in_flight.saturating_sub(in_use)));
            b.max_in_flight = limits.max_in_flight;
        }
        return Ok(());
    }
    let now = shared.clock.now_ms();
    let sent = shared.store.sends_since(business, now - window_ms).await?;
    shared
        .businesses
        .borrow_mut()
        .entry(business)
        .or_insert_with(|| Business {
            permits: Arc::new(Semaphore::new(limits.max_in_flight)),
            max_in_flight: limits.max_in_flight,
            quota: QuotaLog::new(limits.hourly_limit, window_ms, sent),
            blocked_until: 0,
            held: false,
            next_probe_at: now,
            forbidden_chats: Vec::new(),
        });
    Ok(())
}

/// Deletes what outlived the retention, a batch at a time so the writer
/// is never held long.
async fn prune(shared: &Rc<Shared>, now: Millis, retention_days: u64) -> Result<(), StoreError> {
    const BATCH: usize = 2000;
    let before = now - (retention_days * 86_400_000) as Millis;
    let mut total = 0;
    loop {
        let n = shared.store.prune(before, BATCH).await?;
        total += n;
        if n < BATCH as u64 {
            break;
        }
    }
    if total > 0 {
        tracing::info!(
            events = total,
            retention_days,
            "pruned finished events past the retention"
        );
    }
    Ok(())
}

/// One pass over the businesses with work; returns when to look again
/// (`Millis::MAX`: when woken).
async fn round(
    shared: &Rc<Shared>,
    now: Millis,
    next_reclaim: &mut Millis,
) -> Result<Millis, StoreError> {
    let pipeline = shared.pipeline.load_full();
    let dispatch = &pipeline.settings.dispatch;
    let lease_ms = (dispatch.lease_secs * 1000) as Millis;
    if now >= *next_reclaim {
        let ours: Vec<i64> = shared.in_flight.borrow().iter().copied().collect();
        let reclaimed = shared.store.reclaim_expired(now, ours).await?;
        if reclaimed > 0 {
            tracing::warn!(
                count = reclaimed,
                "reclaimed deliveries whose lease expired (a dispatcher stopped mid-send)"
            );
        }
        *next_reclaim = now + lease_ms / 2;
        prune(shared, now, pipeline.settings.storage.retention_days).await?;
    }
    // Nothing to wait for on the clock unless something below says so;
    // sends finishing wake us, and MAX_IDLE covers the rest (leases).
    let mut wake_at = Millis::MAX;
    if *shared.seen_version.borrow() != pipeline.version {
        // A reload may carry a fixed key: probe held businesses now.
        *shared.seen_version.borrow_mut() = pipeline.version.clone();
        for b in shared.businesses.borrow_mut().values_mut() {
            b.next_probe_at = now;
        }
    }
    for (id, b) in shared.businesses.borrow_mut().iter_mut() {
        let label = id.to_string();
        let used = b.quota.used(now) as i64;
        shared
            .metrics
            .quota_used
            .with_label_values(&[&label])
            .set(used);
        shared
            .metrics
            .quota_limit
            .with_label_values(&[&label])
            .set(b.quota.limit() as i64);
    }

    let held: Vec<BusinessId> = shared
        .businesses
        .borrow()
        .iter()
        .filter(|(_, b)| b.held)
        .map(|(id, _)| *id)
        .collect();
    for business in held {
        let permit = {
            let mut map = shared.businesses.borrow_mut();
            let Some(b) = map.get_mut(&business) else {
                continue;
            };
            if now < b.next_probe_at {
                wake_at = wake_at.min(b.next_probe_at);
                continue;
            }
            let Ok(permit) = b.permits.clone().try_acquire_owned() else {
                continue;
            };
            b.next_probe_at = now + (dispatch.held_retry_secs * 1000) as Millis;
            wake_at = wake_at.min(b.next_probe_at);
            permit
        };
        let probe = shared
            .store
            .claim(business, now, now + lease_ms, 1, true)
            .await?;
        match probe.into_iter().next() {
            Some(claimed) => start_send(shared, claimed, permit, now, true),
            // Nothing held any more (an operator cancelled it): resume.
            None => {
                if let Some(b) = shared.businesses.borrow_mut().get_mut(&business) {
                    b.held = false;
                }
            }
        }
    }

    // First decide what each business may take, then claim for all of
    // them at once: the claims share one group commit instead of paying a
    // disk sync each.
    let mut wanted = Vec::new();
    for (business, due_at) in shared.store.queued_businesses().await? {
        ensure_business(shared, business).await?;
        let mut map = shared.businesses.borrow_mut();
        let Some(b) = map.get_mut(&business) else {
            continue;
        };
        if b.held {
            continue;
        }
        if due_at > now {
            wake_at = wake_at.min(due_at);
            continue;
        }
        if b.blocked_until > now {
            wake_at = wake_at.min(b.blocked_until);
            continue;
        }
        let quota = b.quota.available(now) as usize;
        if quota == 0 {
            if let Some(free) = b.quota.next_free(now) {
                wake_at = wake_at.min(free);
            }
            continue;
        }
        let want = quota
            .min(b.permits.available_permits())
            .min(dispatch.claim_batch);
        // want == 0: all permits in use; a send finishing wakes us.
        if want > 0 {
            wanted.push((business, want, b.permits.clone()));
        }
    }
    let claims = futures_util::future::join_all(wanted.iter().map(|(business, want, _)| {
        shared
            .store
            .claim(*business, now, now + lease_ms, *want, false)
    }))
    .await;
    for ((business, want, permits), claimed) in wanted.into_iter().zip(claims) {
        let claimed = claimed?;
        if claimed.len() == want {
            // There may be more due right now.
            wake_at = now;
        } else if let Some(due) = shared.store.next_due(business, now).await? {
            // What is left waits for a retry time (or its chat's turn).
            wake_at = wake_at.min(due);
        }
        for delivery in claimed {
            match permits.clone().try_acquire_owned() {
                Ok(permit) => start_send(shared, delivery, permit, now, false),
                Err(_) => {
                    // Cannot happen (we counted permits on this thread), but
                    // if it did, the delivery must not stay leased.
                    shared.store.release(vec![delivery.id], now).await?;
                }
            }
        }
    }
    Ok(wake_at)
}

fn start_send(
    shared: &Rc<Shared>,
    claimed: Claimed,
    permit: OwnedSemaphorePermit,
    now: Millis,
    probe: bool,
) {
    if let Some(b) = shared.businesses.borrow_mut().get_mut(&claimed.business_id) {
        b.quota.take(now);
    }
    shared.in_flight.borrow_mut().insert(claimed.id);
    actix_rt::spawn(send(shared.clone(), claimed, permit, now, probe));
}

async fn send(
    shared: Rc<Shared>,
    claimed: Claimed,
    permit: OwnedSemaphorePermit,
    slot: Millis,
    probe: bool,
) {
    let pipeline = shared.pipeline.load_full();
    let settings = &pipeline.settings;
    let limits = settings.market.limits_for(claimed.business_id);
    let started = shared.clock.now_ms();
    let wall = std::time::Instant::now();
    let result = match &limits.api_key {
        Some(key) => Some(
            shared
                .client
                .send_message(key, claimed.business_id, claimed.chat_id, &claimed.text)
                .await,
        ),
        None => None,
    };
    let finished = shared.clock.now_ms();
    let latency_ms = wall.elapsed().as_millis() as i64;
    let decision = match &result {
        Some(r) => decide(r),
        None => Decision::KeyRefused(format!(
            "no API key for business {0}: set market.api_key (CHATBRIDGE__MARKET__API_KEY) or [market.businesses.{0}] api_key",
            claimed.business_id
        )),
    };
    let answer = result.as_ref().and_then(|r| r.as_ref().ok());
    let counts_for_quota = match &result {
        Some(Ok(a)) => !matches!(a.status, 420 | 429),
        Some(Err(e)) => e.may_have_arrived(),
        None => false,
    };
    let window_ms = limits.quota_window.as_millis() as Millis;

    let verdict = {
        let mut map = shared.businesses.borrow_mut();
        let business = map.get_mut(&claimed.business_id);
        let verdict = match decision {
            Decision::Delivered => Verdict::Delivered,
            Decision::Retry(reason) => match next_attempt(
                &settings.dispatch,
                claimed.attempts,
                claimed.queued_at,
                finished,
            ) {
                Some(at) => Verdict::Retry { at, reason },
                None => Verdict::Dead {
                    reason: format!(
                        "gave up after {} attempts and {} s (dispatch.max_age_secs): {reason}",
                        claimed.attempts + 1,
                        settings.dispatch.max_age_secs
                    ),
                },
            },
            Decision::Throttle { until } => Verdict::Throttled {
                until: until.filter(|&u| u > finished).unwrap_or(
                    finished + (settings.dispatch.throttle_backoff_secs * 1000) as Millis,
                ),
            },
            Decision::Refused(reason) => Verdict::Dead { reason },
            Decision::KeyRefused(reason) => Verdict::Held { reason },
            Decision::Forbidden(reason) => {
                let other_chat = business.as_ref().is_some_and(|b| {
                    b.forbidden_chats.iter().any(|(chat, at)| {
                        *chat != claimed.chat_id && finished - at < FORBIDDEN_MEMORY_MS
                    })
                });
                if other_chat {
                    Verdict::Held {
                        reason: format!("{reason} (403 on several chats: the key lacks access to this business)"),
                    }
                } else {
                    Verdict::Dead { reason }
                }
            }
        };
        if let Some(b) = business {
            b.quota.give_back(slot);
            if counts_for_quota {
                b.quota.take(finished);
            }
            if let Some(a) = answer {
                if a.status == 403 {
                    b.forbidden_chats
                        .retain(|(_, at)| finished - at < FORBIDDEN_MEMORY_MS);
                    b.forbidden_chats.push((claimed.chat_id, finished));
                }
                if a.remaining == Some(0) {
                    b.blocked_until = b.blocked_until.max(a.until.unwrap_or(finished + window_ms));
                }
            }
            match &verdict {
                Verdict::Throttled { until } => b.blocked_until = b.blocked_until.max(*until),
                Verdict::Held { .. } if !b.held => {
                    b.held = true;
                    b.next_probe_at =
                        finished + (settings.dispatch.held_retry_secs * 1000) as Millis;
                }
                Verdict::Delivered if probe => b.held = false,
                _ => {}
            }
        }
        verdict
    };

    count_attempt(&shared.metrics, &claimed, &result, &verdict, latency_ms);
    log_attempt(
        &claimed,
        answer.map(|a| a.status),
        &result,
        &verdict,
        latency_ms,
    );
    let attempt = Attempt {
        delivery_id: claimed.id,
        business_id: claimed.business_id,
        started_at: started,
        finished_at: finished,
        latency_ms,
        http_status: answer.map(|a| a.status),
        api_errors: answer.map(|a| a.errors.clone()).unwrap_or_default(),
        error: match &result {
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        },
        counts_for_quota,
        verdict: verdict.clone(),
    };
    record_patiently(&shared, attempt).await;
    if probe && verdict == Verdict::Delivered {
        match shared
            .store
            .release_held(claimed.business_id, shared.clock.now_ms())
            .await
        {
            Ok(n) => {
                tracing::warn!(business = %claimed.business_id, released = n, "the business's key works again; held deliveries are queued")
            }
            Err(e) => {
                tracing::error!(business = %claimed.business_id, error = %e, "could not release held deliveries")
            }
        }
    }
    drop(permit);
    let mut in_flight = shared.in_flight.borrow_mut();
    in_flight.remove(&claimed.id);
    if in_flight.is_empty() {
        shared.idle.notify_waiters();
    }
    shared.wake.notify_one();
}

/// The answer is known; the record must land or the message may be sent
/// again after the lease expires. Keep trying for a while.
async fn record_patiently(shared: &Rc<Shared>, attempt: Attempt) {
    let mut wait = Duration::from_millis(50);
    for _ in 0..10 {
        match shared
            .store
            .record(attempt.clone(), shared.clock.now_ms())
            .await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(delivery = attempt.delivery_id, error = %e, "cannot record an attempt; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!(
        delivery = attempt.delivery_id,
        "gave up recording an attempt; the delivery stays leased and will be sent again when its lease expires"
    );
}

fn count_attempt(
    metrics: &Metrics,
    claimed: &Claimed,
    result: &Option<Result<crate::market::client::MarketAnswer, TransportError>>,
    verdict: &Verdict,
    latency_ms: i64,
) {
    let business = claimed.business_id.to_string();
    if let Some(result) = result {
        metrics
            .send_latency
            .with_label_values(&[&business])
            .observe(latency_ms as f64 / 1000.0);
        match result {
            Ok(a) if a.errors.is_empty() => metrics
                .market_requests
                .with_label_values(&[&a.status.to_string(), ""])
                .inc(),
            Ok(a) => {
                for e in &a.errors {
                    metrics
                        .market_requests
                        .with_label_values(&[&a.status.to_string(), &e.code])
                        .inc();
                }
            }
            Err(_) => metrics
                .market_requests
                .with_label_values(&["none", ""])
                .inc(),
        }
    }
    let state = match verdict {
        Verdict::Delivered => "delivered",
        Verdict::Retry { .. } | Verdict::Throttled { .. } => "queued",
        Verdict::Dead { .. } => "dead",
        Verdict::Held { .. } => "held",
    };
    metrics.deliveries_total.with_label_values(&[state]).inc();
}

fn log_attempt(
    claimed: &Claimed,
    status: Option<u16>,
    result: &Option<Result<crate::market::client::MarketAnswer, TransportError>>,
    verdict: &Verdict,
    latency_ms: i64,
) {
    let codes = match result {
        Some(Ok(a)) => a
            .errors
            .iter()
            .map(|e| e.code.as_str())
            .collect::<Vec<_>>()
            .join(","),
        _ => String::new(),
    };
    let status = status.map(|s| s as i64).unwrap_or(-1);
    macro_rules! log {
        ($level:ident, $msg:expr, $reason:expr) => {
            tracing::$level!(
                delivery = claimed.id,
                business = %claimed.business_id,
                chat = %claimed.chat_id,
                route = %claimed.route,
                status,
                codes = %codes,
                latency_ms,
                reason = %$reason,
                $msg
            )
        };
    }
    match verdict {
        Verdict::Delivered => log!(info, "delivered", ""),
        Verdict::Retry { reason, .. } => log!(warn, "send failed; will retry", reason),
        Verdict::Throttled { .. } => {
            log!(warn, "Market rate limit (420); waiting for its window", "")
        }
        Verdict::Dead { reason } => log!(error, "delivery is dead", reason),
        Verdict::Held { reason } => log!(
            error,
            "the business's API key is refused; holding its deliveries until it works",
            reason
        ),
    }
}
