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
//!   than `max_in_flight` requests at once. Within this process a
//!   semaphore per business and a log of its calls keep them; with several
//!   processes on one PostgreSQL database the claim keeps them across all
//!   of them (`store/postgres.rs`: under the business's advisory lock it
//!   counts every process's `sending` rows and quota slots and reads the
//!   stored pauses), so this process's own counts only ever ask for less;
//! - the Market's pauses (a 420, or `X-RateLimit-Resource-Remaining: 0`)
//!   are recorded with the attempt: a restarted process, and on PostgreSQL
//!   every other one, waits for the same window;
//! - wake-ups: a webhook accepted, a send finished or a reload wakes the
//!   dispatcher at once (not a webhook whose deliveries all wait for a
//!   blocked business's time anyway: `ingest::needs_round`); on PostgreSQL
//!   so does work another process made due (`Store::wake_on_work`,
//!   LISTEN/NOTIFY); `dispatch.poll_interval_ms` is the fallback for
//!   anything else;
//! - per conversation, messages go in the order their events were
//!   accepted: a delivery is claimed only when no earlier one of its
//!   conversation is open. A delivery to the chat of an order or return
//!   whose chat is not known yet is first claimed to find it
//!   (`chats/new`): it is the only open head of that order's conversation,
//!   so one call per order is in flight, ever; the chat is remembered in
//!   the store, and the delivery goes back to the queue to be sent;
//! - `chats/new` has its own quota and its own 420 pause, apart from the
//!   sends', so new orders never stop sends to known chats, nor the other
//!   way round; `max_in_flight` counts both methods together;
//! - every answer maps to one state (see `retry::decide`): 200 delivered;
//!   400/404 dead; 401 (or 403 on several chats) held, probed every
//!   `held_retry_secs`; 420 waits for the window, not counted as an
//!   attempt; 5xx and transport errors retried with capped, jittered
//!   backoff until `max_age_secs`, then dead.
//! - errors of the store or the API never make it spin: every loop waits.
//!   While the store is unavailable (`store::health`) it claims nothing:
//!   each round fails at its first store call, and the next waits a
//!   backoff capped at [`MAX_STORE_BACKOFF`] (or less: the store's
//!   recovery wakes it), first probing the store with a write. Nothing is
//!   logged per round: the outage has its own two lines. An answer the
//!   Market gave meanwhile is kept and recorded once the store is back
//!   (`record_patiently`), and the first round after an outage reclaims
//!   expired leases, so nothing stays `sending` past its lease.
//!
//! awc's client is `!Send`, so the dispatcher runs on one actix thread and
//! shares its state through `Rc`.

pub mod quota;
pub mod retry;
pub mod status;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::clock::{to_rfc3339, Millis, SharedClock};
use crate::domain::{conversation_key, BusinessId, MarketMethod};
use crate::market::client::{MarketAnswer, MarketClient, TransportError};
use crate::pipeline::Pipeline;
use crate::store::health::StoreHealth;
use crate::store::{Attempt, ClaimLimits, Claimed, SharedCaps, Store, StoreError, Verdict};
use crate::telemetry::Metrics;
use quota::QuotaLog;
use retry::{decide, next_attempt, throttled_until, window_surely_over, Decision};
use status::{publish, DispatchStatus, PauseReason};

/// Shortest time between two rounds started by wake-ups.
const MIN_ROUND_GAP: Duration = Duration::from_millis(2);
/// The longest wait between two tries while the store fails.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(5);
/// A 403 on another conversation within this span means the key, not the chat, is refused.
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

/// One Market method's budget for one business.
struct MethodBudget {
    quota: QuotaLog,
    /// The Market said this method's window is used up (420 or Remaining: 0).
    blocked_until: Millis,
    blocked_why: Option<PauseReason>,
}

impl MethodBudget {
    /// Calls that may start now, or when to look again.
    fn available(&mut self, now: Millis) -> Result<usize, Millis> {
        if self.blocked_until > now {
            return Err(self.blocked_until);
        }
        match self.quota.available(now) as usize {
            0 => Err(self.quota.next_free(now).unwrap_or(Millis::MAX)),
            n => Ok(n),
        }
    }
}

struct Business {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    sends: MethodBudget,
    chat_lookups: MethodBudget,
    held: bool,
    held_why: Option<String>,
    next_probe_at: Millis,
    /// Conversations (`domain::conversation_key`) answered 403 lately.
    forbidden: Vec<(String, Millis)>,
}

impl Business {
    fn budget(&mut self, method: MarketMethod) -> &mut MethodBudget {
        match method {
            MarketMethod::SendMessage => &mut self.sends,
            MarketMethod::CreateChat => &mut self.chat_lookups,
        }
    }
}

struct Shared {
    store: Arc<dyn Store>,
    health: Arc<StoreHealth>,
    pipeline: Arc<ArcSwap<Pipeline>>,
    clock: SharedClock,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// What the admin API shows of each business (see `status`).
    status: Arc<DispatchStatus>,
    client: MarketClient,
    /// The configuration version last seen; a new one re-probes held businesses.
    seen_version: RefCell<String>,
    businesses: RefCell<HashMap<BusinessId, Business>>,
    /// Deliveries being sent by this process: id → claim token.
    in_flight: RefCell<HashMap<i64, i64>>,
    idle: Notify,
}

/// Starts the dispatcher on the current actix thread.
pub fn spawn(
    store: Arc<dyn Store>,
    pipeline: Arc<ArcSwap<Pipeline>>,
    clock: SharedClock,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    status: Arc<DispatchStatus>,
    health: Arc<StoreHealth>,
) -> DispatcherHandle {
    let settings = &pipeline.load().settings;
    // On a database shared by several processes, work another one accepts
    // wakes this dispatcher too.
    store.wake_on_work(wake.clone());
    let client = MarketClient::new(
        &settings.market.base_url,
        Duration::from_secs(settings.market.request_timeout_secs),
    );
    let shared = Rc::new(Shared {
        store,
        health,
        pipeline: pipeline.clone(),
        clock,
        wake,
        metrics,
        status,
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
        // While the store is down, a write proves it is back before any
        // claim is tried (and tells store::health, even with no traffic).
        let probed = match shared.health.is_down() {
            true => shared.store.ping().await,
            false => Ok(()),
        };
        let outcome = match probed {
            Ok(()) => round(&shared, now, &mut next_reclaim).await,
            Err(e) => Err(e),
        };
        let wake_at = match outcome {
            Ok(at) => {
                failures = 0;
                at
            }
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(100u64 << failures.min(6)).min(MAX_STORE_BACKOFF);
                if e.is_unavailable() {
                    // store::health logged the outage once; not every round.
                    tracing::debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "dispatcher: the store is unavailable");
                } else {
                    tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "dispatcher: a store call failed");
                }
                // Leases may have expired meanwhile: reclaim first thing.
                next_reclaim = 0;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.health.recovered() => {}
                    _ = stop.changed() => {}
                }
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
            // Real-time cap on any wait (`dispatch.poll_interval_ms`), so
            // a manual clock moved or a lost wake-up costs at most this.
            _ = tokio::time::sleep(poll_interval(&shared)) => {}
            _ = stop.changed() => {}
        }
    }
    drain(&shared).await;
}

fn poll_interval(shared: &Shared) -> Duration {
    Duration::from_millis(shared.pipeline.load().settings.dispatch.poll_interval_ms)
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
    let left: Vec<(i64, i64)> = shared
        .in_flight
        .borrow()
        .iter()
        .map(|(id, token)| (*id, *token))
        .collect();
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
        for method in MarketMethod::ALL {
            b.budget(method)
                .quota
                .set_limits(limits.limit_of(method), window_ms);
        }
        if b.max_in_flight != limits.max_in_flight {
            let in_use = b.max_in_flight - b.permits.available_permits();
            b.permits = Arc::new(Semaphore::new(limits.max_in_flight.saturating_sub(in_use)));
            b.max_in_flight = limits.max_in_flight;
        }
        return Ok(());
    }
    let now = shared.clock.now_ms();
    // The Market's pauses stored before this process knew the business
    // (before a restart, or by another process on the database).
    let pauses = shared.store.method_pauses(business, now).await?;
    let mut budgets = Vec::new();
    for method in MarketMethod::ALL {
        let calls = shared
            .store
            .calls_since(business, method, now - window_ms)
            .await?;
        let pause = pauses.iter().find(|p| p.method == method);
        budgets.push(MethodBudget {
            quota: QuotaLog::new(limits.limit_of(method), window_ms, calls),
            blocked_until: pause.map_or(0, |p| p.until),
            blocked_why: pause.map(|p| p.reason),
        });
    }
    let (Some(chat_lookups), Some(sends)) = (budgets.pop(), budgets.pop()) else {
        return Ok(());
    };
    shared
        .businesses
        .borrow_mut()
        .entry(business)
        .or_insert_with(|| Business {
            permits: Arc::new(Semaphore::new(limits.max_in_flight)),
            max_in_flight: limits.max_in_flight,
            sends,
            chat_lookups,
            held: false,
            held_why: None,
            next_probe_at: now,
            forbidden: Vec::new(),
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
        let ours: Vec<i64> = shared.in_flight.borrow().keys().copied().collect();
        let reclaimed = shared.store.reclaim_expired(now, ours).await?;
        if reclaimed > 0 {
            tracing::warn!(
                count = reclaimed,
                "reclaimed deliveries whose lease expired (a dispatcher stopped mid-send)"
            );
        }
        *next_reclaim = now + lease_ms / 2;
        // Another process (on a shared database) may have found a
        // business's key refused: hold it here too, and probe it.
        for business in shared.store.held_businesses().await? {
            ensure_business(shared, business).await?;
            if let Some(b) = shared.businesses.borrow_mut().get_mut(&business) {
                b.held = true;
            }
        }
        prune(shared, now, pipeline.settings.storage.retention_days).await?;
    }
    // Nothing to wait for on the clock unless something below says so;
    // sends finishing wake us, and the poll interval covers the rest (leases).
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
        let used = b.sends.quota.used(now) as i64;
        shared
            .metrics
            .quota_used
            .with_label_values(&[&label])
            .set(used);
        shared
            .metrics
            .quota_limit
            .with_label_values(&[&label])
            .set(b.sends.quota.limit() as i64);
        publish(&shared.status, *id, b, now);
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
            .claim(
                business,
                now,
                now + lease_ms,
                ClaimLimits {
                    sends: 1,
                    chat_lookups: 1,
                    total: 1,
                    caps: caps_of(&pipeline.settings, business),
                },
                true,
            )
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
    // them at once (`Store::claim_round`): on SQLite one write and one
    // commit for the round, instead of a write and a read per business.
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
        // Each method's quota and pause apply to it alone; the request
        // slots are shared, half each when both have work waiting.
        let mut budget = |method| match b.budget(method).available(now) {
            Ok(n) => n,
            Err(at) => {
                wake_at = wake_at.min(at);
                0
            }
        };
        let sends = budget(MarketMethod::SendMessage);
        let chat_lookups = budget(MarketMethod::CreateChat);
        let total = b
            .permits
            .available_permits()
            .min(dispatch.claim_batch)
            .min(sends + chat_lookups);
        let limits = ClaimLimits {
            caps: caps_of(&pipeline.settings, business),
            sends,
            chat_lookups: if sends > 0 {
                chat_lookups.min(total.div_ceil(2))
            } else {
                chat_lookups
            },
            total,
        };
        // total == 0: all permits in use (a call finishing wakes us) or
        // both methods wait for their windows (wake_at has the time).
        if total > 0 {
            wanted.push((business, limits, b.permits.clone()));
        }
    }
    let round = match wanted.is_empty() {
        true => Vec::new(),
        false => {
            shared
                .store
                .claim_round(
                    wanted.iter().map(|(b, limits, _)| (*b, *limits)).collect(),
                    now,
                    now + lease_ms,
                )
                .await?
        }
    };
    for ((_, limits, permits), taken) in wanted.into_iter().zip(round) {
        if taken.claimed.len() == limits.total {
            // There may be more due right now.
            wake_at = now;
        } else if let Some(due) = taken.next_due {
            // What is left waits for a retry time (or its conversation's turn).
            wake_at = wake_at.min(due);
        }
        for delivery in taken.claimed {
            match permits.clone().try_acquire_owned() {
                Ok(permit) => start_send(shared, delivery, permit, now, false),
                Err(_) => {
                    // Cannot happen (we counted permits on this thread), but
                    // if it did, the delivery must not stay leased.
                    shared
                        .store
                        .release(vec![(delivery.id, delivery.claim_token)], now)
                        .await?;
                }
            }
        }
    }
    Ok(wake_at)
}

/// The business's limits for a store shared by several processes to
/// enforce across all of them (see `store::SharedCaps`).
fn caps_of(settings: &crate::settings::Settings, business: BusinessId) -> SharedCaps {
    let limits = settings.market.limits_for(business);
    SharedCaps {
        max_in_flight: limits.max_in_flight,
        send_limit: limits.limit_of(MarketMethod::SendMessage),
        lookup_limit: limits.limit_of(MarketMethod::CreateChat),
        window_ms: limits.quota_window.as_millis() as Millis,
    }
}

/// The Market method a claimed delivery needs next: its send, or first
/// the `chats/new` call that finds its chat.
fn method_of(claimed: &Claimed) -> MarketMethod {
    if claimed.chat_id.is_some() {
        MarketMethod::SendMessage
    } else {
        MarketMethod::CreateChat
    }
}

fn start_send(
    shared: &Rc<Shared>,
    claimed: Claimed,
    permit: OwnedSemaphorePermit,
    now: Millis,
    probe: bool,
) {
    if let Some(b) = shared.businesses.borrow_mut().get_mut(&claimed.business_id) {
        b.budget(method_of(&claimed)).quota.take(now);
    }
    shared
        .in_flight
        .borrow_mut()
        .insert(claimed.id, claimed.claim_token);
    actix_rt::spawn(send(shared.clone(), claimed, permit, now, probe));
}

/// Makes the one Market call the claimed delivery needs, decides what the
/// answer means, and records it.
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
    let method = method_of(&claimed);
    let started = shared.clock.now_ms();
    let wall = std::time::Instant::now();
    let result = match (&limits.api_key, claimed.chat_id, claimed.context) {
        (Some(key), Some(chat), _) => Some(
            shared
                .client
                .send_message(key, claimed.business_id, chat, &claimed.text)
                .await,
        ),
        (Some(key), None, Some(context)) => Some(
            shared
                .client
                .create_chat(key, claimed.business_id, context)
                .await,
        ),
        _ => None,
    };
    let finished = shared.clock.now_ms();
    let latency_ms = wall.elapsed().as_millis() as i64;
    let decision = match &result {
        Some(r) => decide(r),
        None if limits.api_key.is_none() => Decision::KeyRefused(format!(
            "no API key for business {0}: set market.api_key (CHATBRIDGE__MARKET__API_KEY) or [market.businesses.{0}] api_key",
            claimed.business_id
        )),
        // The store keeps a chat or a context for every queued delivery.
        None => Decision::Refused("the delivery has neither a chat nor an order or return".into()),
    };
    let answer = result.as_ref().and_then(|r| r.as_ref().ok());
    let counts_for_quota = match &result {
        Some(Ok(a)) => !matches!(a.status, 420 | 429),
        Some(Err(e)) => e.may_have_arrived(),
        None => false,
    };
    let window_ms = limits.quota_window.as_millis() as Millis;
    // "Remaining: 0": no call of this method until the window ends. The
    // store keeps it too (see `Attempt::window_used_up_until`).
    let window_used_up_until = answer.filter(|a| a.remaining == Some(0)).map(|a| {
        a.until
            .map(window_surely_over)
            .unwrap_or(finished + window_ms)
    });
    let conversation = conversation_key(claimed.chat_id, claimed.context).unwrap_or_default();
    // What the Market refused, named for the operator: a chat lookup's
    // failure says which order or return had no chat.
    let about = |reason: String| match (method, claimed.context) {
        (MarketMethod::CreateChat, Some(context)) => {
            format!("finding the chat of {context} (chats/new): {reason}")
        }
        _ => reason,
    };

    let verdict = {
        let mut map = shared.businesses.borrow_mut();
        let business = map.get_mut(&claimed.business_id);
        let verdict = match decision {
            Decision::Delivered => match (method, claimed.context, answer) {
                (MarketMethod::SendMessage, _, _) => Verdict::Delivered,
                (
                    MarketMethod::CreateChat,
                    Some(context),
                    Some(MarketAnswer {
                        chat_id: Some(chat),
                        ..
                    }),
                ) => Verdict::ChatFound {
                    context,
                    chat: *chat,
                },
                _ => retry_or_dead(
                    settings,
                    &claimed,
                    finished,
                    about(format!(
                        "Market answered {} without result.chatId",
                        answer.map(|a| a.status).unwrap_or_default()
                    )),
                ),
            },
            Decision::Retry(reason) => retry_or_dead(settings, &claimed, finished, about(reason)),
            Decision::Throttle { until } => Verdict::Throttled {
                until: throttled_until(
                    until,
                    finished,
                    (settings.dispatch.throttle_backoff_secs * 1000) as Millis,
                ),
            },
            Decision::Refused(reason) => Verdict::Dead {
                reason: about(reason),
            },
            Decision::KeyRefused(reason) => Verdict::Held {
                reason: about(reason),
            },
            Decision::Forbidden(reason) => {
                let elsewhere = business.as_ref().is_some_and(|b| {
                    b.forbidden.iter().any(|(other, at)| {
                        *other != conversation && finished - at < FORBIDDEN_MEMORY_MS
                    })
                });
                if elsewhere {
                    Verdict::Held {
                        reason: format!(
                            "{} (403 on several chats: the key lacks access to this business)",
                            about(reason)
                        ),
                    }
                } else {
                    Verdict::Dead {
                        reason: about(reason),
                    }
                }
            }
        };
        if let Some(b) = business {
            let budget = b.budget(method);
            budget.quota.give_back(slot);
            if counts_for_quota {
                budget.quota.take(finished);
            }
            if let Some(until) = window_used_up_until {
                budget.blocked_until = budget.blocked_until.max(until);
                budget.blocked_why = Some(PauseReason::RemainingZero);
            }
            if let Verdict::Throttled { until } = &verdict {
                budget.blocked_until = budget.blocked_until.max(*until);
                budget.blocked_why = Some(PauseReason::Market420);
            }
            if answer.is_some_and(|a| a.status == 403) {
                b.forbidden
                    .retain(|(_, at)| finished - at < FORBIDDEN_MEMORY_MS);
                b.forbidden.push((conversation.clone(), finished));
            }
            match &verdict {
                Verdict::Held { reason } if !b.held => {
                    b.held = true;
                    b.held_why = Some(reason.clone());
                    b.next_probe_at =
                        finished + (settings.dispatch.held_retry_secs * 1000) as Millis;
                }
                Verdict::Delivered | Verdict::ChatFound { .. } if probe => b.held = false,
                _ => {}
            }
            publish(&shared.status, claimed.business_id, b, finished);
        }
        verdict
    };

    count_attempt(&shared.metrics, &claimed, &result, &verdict, latency_ms);
    log_attempt(
        &claimed,
        method,
        answer.map(|a| a.status),
        &result,
        &verdict,
        latency_ms,
    );
    let attempt = Attempt {
        delivery_id: claimed.id,
        claim_token: claimed.claim_token,
        business_id: claimed.business_id,
        method,
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
        window_used_up_until,
        verdict: verdict.clone(),
    };
    record_patiently(&shared, attempt).await;
    if probe && matches!(verdict, Verdict::Delivered | Verdict::ChatFound { .. }) {
        match shared
            .store
            .release_held(claimed.business_id, shared.clock.now_ms())
            .await
        {
            Ok(n) => {
                tracing::warn!(
                    business = claimed.business_id.0,
                    released = n,
                    "the business's key works again; held deliveries are queued"
                )
            }
            Err(e) => {
                tracing::error!(business = claimed.business_id.0, error = %e, "could not release held deliveries")
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

/// A retryable failure: back to the queue with backoff, or dead once the
/// delivery has outlived `dispatch.max_age_secs`.
fn retry_or_dead(
    settings: &crate::settings::Settings,
    claimed: &Claimed,
    now: Millis,
    reason: String,
) -> Verdict {
    match next_attempt(&settings.dispatch, claimed.attempts, claimed.queued_at, now) {
        Some(at) => Verdict::Retry { at, reason },
        None => Verdict::Dead {
            reason: format!(
                "gave up after {} attempts and {} s (dispatch.max_age_secs): {reason}",
                claimed.attempts + 1,
                settings.dispatch.max_age_secs
            ),
        },
    }
}

/// The answer is known; the record must land or the message may be sent
/// again after the lease expires. While the store is unavailable it keeps
/// trying until the store is back (the delivery stays this process's own,
/// so nothing here reclaims it meanwhile); any other failure is retried
/// for a while, then the lease decides.
async fn record_patiently(shared: &Rc<Shared>, attempt: Attempt) {
    let mut wait = Duration::from_millis(50);
    let mut other_failures = 0;
    loop {
        match shared
            .store
            .record(attempt.clone(), shared.clock.now_ms())
            .await
        {
            Ok(()) => return,
            Err(e) if e.is_unavailable() => {
                tracing::debug!(delivery = attempt.delivery_id, error = %e, "cannot record an attempt until the store is back");
            }
            Err(e) => {
                other_failures += 1;
                if other_failures >= 10 {
                    tracing::error!(
                        delivery = attempt.delivery_id,
                        error = %e,
                        "gave up recording an attempt; the delivery stays leased and will be sent again when its lease expires"
                    );
                    return;
                }
                tracing::error!(delivery = attempt.delivery_id, error = %e, "cannot record an attempt; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.health.recovered() => {}
        }
        wait = (wait * 2).min(MAX_STORE_BACKOFF);
    }
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
        Verdict::Retry { .. } | Verdict::Throttled { .. } | Verdict::ChatFound { .. } => "queued",
        Verdict::Dead { .. } => "dead",
        Verdict::Held { .. } => "held",
    };
    metrics.deliveries_total.with_label_values(&[state]).inc();
}

fn log_attempt(
    claimed: &Claimed,
    method: MarketMethod,
    status: Option<u16>,
    result: &Option<Result<MarketAnswer, TransportError>>,
    verdict: &Verdict,
    latency_ms: i64,
) {
    // Empty fields are left out, not logged as `codes=` / `reason=`; ids
    // are numbers in every line.
    let codes = match result {
        Some(Ok(a)) if !a.errors.is_empty() => Some(
            a.errors
                .iter()
                .map(|e| e.code.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => None,
    };
    let order = claimed
        .context
        .filter(|c| c.kind == crate::domain::ContextKind::Order)
        .map(|c| c.id);
    let return_id = claimed
        .context
        .filter(|c| c.kind == crate::domain::ContextKind::Return)
        .map(|c| c.id);
    let status = status.map(|s| s as i64).unwrap_or(-1);
    let next_attempt_at = match verdict {
        Verdict::Retry { at, .. } => Some(to_rfc3339(*at)),
        Verdict::Throttled { until } => Some(to_rfc3339(*until)),
        _ => None,
    };
    macro_rules! log {
        ($level:ident, $msg:expr, $reason:expr) => {
            tracing::$level!(
                delivery = claimed.id,
                business = claimed.business_id.0,
                chat = claimed.chat_id.map(|c| c.0),
                order,
                "return" = return_id,
                method = method.as_str(),
                route = %claimed.route,
                status,
                codes = codes.as_deref(),
                latency_ms,
                reason = $reason,
                next_attempt_at = next_attempt_at.as_deref(),
                $msg
            )
        };
    }
    match verdict {
        Verdict::Delivered => log!(info, "delivered", None::<&str>),
        Verdict::ChatFound { chat, .. } => tracing::info!(
            delivery = claimed.id,
            business = claimed.business_id.0,
            chat = chat.0,
            order,
            "return" = return_id,
            route = %claimed.route,
            latency_ms,
            "found the chat of the order or return (chats/new); its messages go there now"
        ),
        Verdict::Retry { reason, .. } => {
            log!(
                warn,
                "Market call failed; will retry",
                Some(reason.as_str())
            )
        }
        Verdict::Throttled { .. } => {
            log!(
                warn,
                "Market rate limit (420); waiting for its window",
                None::<&str>
            )
        }
        Verdict::Dead { reason } => log!(error, "delivery is dead", Some(reason.as_str())),
        Verdict::Held { reason } => log!(
            error,
            "the business's API key is refused; holding its deliveries until it works",
            Some(reason.as_str())
        ),
    }
}
