//! Whether the database is up, as the service last found it, and what the
//! rest of the service does with that: one place that hears the outcome
//! of every store call, so an outage is noticed wherever it shows first
//! (a webhook, the dispatcher, `/readyz`, the admin API) and reported once.
//!
//! [`Watched`] wraps the backend behind the `Store` trait and tells
//! [`StoreHealth`] how each call ended. Guarantees:
//! - the first [`StoreError::Unavailable`] while up marks the store down:
//!   one ERROR line with the reason (the `storage.url` password scrubbed),
//!   `chatbridge_store_up` 0;
//! - the first successful *write* (or `ping`, which is one) started while
//!   down marks it up again: one WARN line saying how long it was out and
//!   how many webhooks were refused meanwhile, `chatbridge_store_up` 1, and
//!   whoever waits in [`StoreHealth::recovered`] (the dispatcher) wakes. A
//!   read does not count: a full SQLite disk still reads;
//! - a call's outcome changes the state only if no change happened since
//!   the call started, so a slow call from before the outage (or a stale
//!   error from during it) cannot make the log flap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::*;
use crate::clock::{to_rfc3339, SharedClock};

pub struct StoreHealth {
    clock: SharedClock,
    up_gauge: prometheus::IntGauge,
    /// `storage.url` with its password replaced, for the log.
    url: String,
    /// The password in `storage.url`, scrubbed from every reason we log.
    password: Option<String>,
    state: Mutex<Option<Outage>>,
    /// Bumped at every change between up and down (see the module docs).
    generation: AtomicU64,
    recovered: Notify,
}

/// The outage in progress.
#[derive(Debug, Clone)]
pub struct Outage {
    pub since: Millis,
    pub reason: String,
    /// Webhooks and notifications refused since (503 / 500).
    pub refused: u64,
}

/// Whether a call can prove that writes work again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

impl StoreHealth {
    /// Starts up: the store has just been opened.
    pub fn new(clock: SharedClock, up_gauge: prometheus::IntGauge, storage_url: &str) -> Self {
        up_gauge.set(1);
        Self {
            clock,
            up_gauge,
            url: redact_url(storage_url),
            password: url_password(storage_url),
            state: Mutex::new(None),
            generation: AtomicU64::new(0),
            recovered: Notify::new(),
        }
    }

    /// Read before a store call; give it back to [`observe`](Self::observe).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The outage in progress, if any.
    pub fn outage(&self) -> Option<Outage> {
        self.lock().clone()
    }

    pub fn is_down(&self) -> bool {
        self.lock().is_some()
    }

    /// Counts a webhook or notification refused because the store is down.
    pub fn refused(&self) {
        if let Some(outage) = self.lock().as_mut() {
            outage.refused += 1;
        }
    }

    /// Resolves at the next recovery.
    pub async fn recovered(&self) {
        self.recovered.notified().await
    }

    /// A failure seen outside a store call (a check that timed out).
    pub fn failed(&self, seen: u64, error: &StoreError) {
        self.observe(seen, Kind::Read, Err(error));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Outage>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn observe(&self, seen: u64, kind: Kind, outcome: Result<(), &StoreError>) {
        let unavailable = match outcome {
            Err(e) if e.is_unavailable() => Some(e),
            Err(_) => return,
            Ok(()) if kind == Kind::Write => None,
            Ok(()) => return,
        };
        let mut state = self.lock();
        if self.generation() != seen || state.is_some() == unavailable.is_some() {
            return;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        let now = self.clock.now_ms();
        match unavailable {
            Some(e) => {
                let reason = self.scrub(&e.to_string());
                tracing::error!(
                    storage = %self.url,
                    reason = %reason,
                    "the store is unavailable: webhooks are refused (503, Market notifications 500) and nothing is sent until it is back; no restart is needed"
                );
                self.up_gauge.set(0);
                *state = Some(Outage {
                    since: now,
                    reason,
                    refused: 0,
                });
            }
            None => {
                let outage = state.take();
                let (since, refused) = outage.map(|o| (o.since, o.refused)).unwrap_or((now, 0));
                tracing::warn!(
                    storage = %self.url,
                    unavailable_since = %to_rfc3339(since),
                    out_for_secs = (now - since).max(0) / 1000,
                    refused_webhooks = refused,
                    "the store is available again; webhooks are accepted and sending resumes"
                );
                self.up_gauge.set(1);
                drop(state);
                self.recovered.notify_waiters();
            }
        }
    }

    fn scrub(&self, text: &str) -> String {
        match &self.password {
            Some(p) if !p.is_empty() => text.replace(p.as_str(), "***"),
            _ => text.to_owned(),
        }
    }
}

/// The password of a `storage.url` (user part or `password=` parameter).
fn url_password(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    if let Some((user, _)) = authority.rsplit_once('@') {
        if let Some((_, password)) = user.split_once(':') {
            return Some(password.to_owned());
        }
    }
    let query = &url[url.find('?')? + 1..];
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("password"))
        .map(|(_, v)| v.to_owned())
}

/// The backend with every call's outcome told to [`StoreHealth`].
pub struct Watched {
    inner: Arc<dyn Store>,
    health: Arc<StoreHealth>,
}

impl Watched {
    pub fn new(inner: Arc<dyn Store>, health: Arc<StoreHealth>) -> Self {
        Self { inner, health }
    }

    async fn watch<T>(
        &self,
        kind: Kind,
        call: impl std::future::Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let seen = self.health.generation();
        let result = call.await;
        self.health.observe(seen, kind, result.as_ref().map(|_| ()));
        result
    }
}

use Kind::{Read, Write};

#[async_trait]
impl Store for Watched {
    async fn insert_event(&self, event: NewEvent) -> StoreResult<Inserted> {
        self.watch(Write, self.inner.insert_event(event)).await
    }

    async fn queued_businesses(&self) -> StoreResult<Vec<(BusinessId, Millis)>> {
        self.watch(Read, self.inner.queued_businesses()).await
    }

    async fn claim(
        &self,
        business: BusinessId,
        now: Millis,
        lease_until: Millis,
        limits: ClaimLimits,
        held: bool,
    ) -> StoreResult<Vec<Claimed>> {
        self.watch(
            Write,
            self.inner.claim(business, now, lease_until, limits, held),
        )
        .await
    }

    async fn claim_round(
        &self,
        wanted: Vec<(BusinessId, ClaimLimits)>,
        now: Millis,
        lease_until: Millis,
    ) -> StoreResult<Vec<RoundClaim>> {
        self.watch(Write, self.inner.claim_round(wanted, now, lease_until))
            .await
    }

    async fn next_due(&self, business: BusinessId, now: Millis) -> StoreResult<Option<Millis>> {
        self.watch(Read, self.inner.next_due(business, now)).await
    }

    async fn record(&self, attempt: Attempt, now: Millis) -> StoreResult<()> {
        self.watch(Write, self.inner.record(attempt, now)).await
    }

    async fn release(&self, ids: Vec<(i64, i64)>, now: Millis) -> StoreResult<()> {
        self.watch(Write, self.inner.release(ids, now)).await
    }

    async fn calls_since(
        &self,
        business: BusinessId,
        method: MarketMethod,
        since: Millis,
    ) -> StoreResult<Vec<Millis>> {
        self.watch(Read, self.inner.calls_since(business, method, since))
            .await
    }

    async fn known_chat(
        &self,
        business: BusinessId,
        context: ChatContext,
    ) -> StoreResult<Option<ChatId>> {
        self.watch(Read, self.inner.known_chat(business, context))
            .await
    }

    async fn reclaim_expired(&self, now: Millis, ours: Vec<i64>) -> StoreResult<u64> {
        self.watch(Write, self.inner.reclaim_expired(now, ours))
            .await
    }

    async fn held_businesses(&self) -> StoreResult<Vec<BusinessId>> {
        self.watch(Read, self.inner.held_businesses()).await
    }

    async fn release_held(&self, business: BusinessId, now: Millis) -> StoreResult<u64> {
        self.watch(Write, self.inner.release_held(business, now))
            .await
    }

    async fn delivery(&self, id: i64) -> StoreResult<Option<(DeliveryRow, Vec<AttemptRow>)>> {
        self.watch(Read, self.inner.delivery(id)).await
    }

    async fn list_deliveries(&self, filter: DeliveryFilter) -> StoreResult<Vec<DeliveryRow>> {
        self.watch(Read, self.inner.list_deliveries(filter)).await
    }

    async fn event(&self, id: i64) -> StoreResult<Option<StoredEvent>> {
        self.watch(Read, self.inner.event(id)).await
    }

    async fn event_by_source_id(
        &self,
        source: String,
        external_id: String,
    ) -> StoreResult<Option<StoredEvent>> {
        self.watch(Read, self.inner.event_by_source_id(source, external_id))
            .await
    }

    async fn recent_events(&self, limit: usize) -> StoreResult<Vec<StoredEvent>> {
        self.watch(Read, self.inner.recent_events(limit)).await
    }

    async fn requeue(&self, id: i64, message: RenderedMessage, now: Millis) -> StoreResult<()> {
        self.watch(Write, self.inner.requeue(id, message, now))
            .await
    }

    async fn mark_failed(&self, id: i64, reason: String, now: Millis) -> StoreResult<()> {
        self.watch(Write, self.inner.mark_failed(id, reason, now))
            .await
    }

    async fn cancel(&self, id: i64, now: Millis) -> StoreResult<()> {
        self.watch(Write, self.inner.cancel(id, now)).await
    }

    async fn queue_summary(&self) -> StoreResult<Vec<BusinessQueue>> {
        self.watch(Read, self.inner.queue_summary()).await
    }

    async fn state_counts(&self) -> StoreResult<Vec<(DeliveryState, i64)>> {
        self.watch(Read, self.inner.state_counts()).await
    }

    async fn queue_gauges(&self) -> StoreResult<QueueGauges> {
        self.watch(Read, self.inner.queue_gauges()).await
    }

    fn changed_by_other_processes(&self) -> bool {
        self.inner.changed_by_other_processes()
    }

    async fn prune(&self, before: Millis, batch: usize) -> StoreResult<u64> {
        self.watch(Write, self.inner.prune(before, batch)).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.watch(Write, self.inner.ping()).await
    }

    async fn method_pauses(
        &self,
        business: BusinessId,
        now: Millis,
    ) -> StoreResult<Vec<MethodPause>> {
        self.watch(Read, self.inner.method_pauses(business, now))
            .await
    }

    fn wake_on_work(&self, wake: Arc<Notify>) {
        self.inner.wake_on_work(wake);
    }

    async fn campaign_business(&self, campaign: i64) -> StoreResult<Option<BusinessId>> {
        self.watch(Read, self.inner.campaign_business(campaign))
            .await
    }

    async fn remember_campaign(
        &self,
        campaign: i64,
        business: BusinessId,
        now: Millis,
    ) -> StoreResult<()> {
        self.watch(Write, self.inner.remember_campaign(campaign, business, now))
            .await
    }

    async fn queue_waits(&self, business: BusinessId, now: Millis) -> StoreResult<QueueWaits> {
        self.watch(Read, self.inner.queue_waits(business, now))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn health() -> (StoreHealth, prometheus::IntGauge) {
        let gauge = prometheus::IntGauge::new("up", "up").unwrap();
        let clock = ManualClock::new(0);
        let h = StoreHealth::new(clock, gauge.clone(), "postgres://app:s3cret@db/chat");
        (h, gauge)
    }

    fn down() -> StoreError {
        StoreError::Unavailable("connection to app:s3cret refused".into())
    }

    #[test]
    fn down_on_the_first_unavailable_error_up_on_the_first_write_after_it() {
        let (h, gauge) = health();
        assert_eq!(gauge.get(), 1);
        let seen = h.generation();
        h.observe(seen, Write, Err(&down()));
        assert!(h.is_down());
        assert_eq!(gauge.get(), 0);
        assert!(!h.outage().unwrap().reason.contains("s3cret"));
        h.refused();
        h.refused();
        assert_eq!(h.outage().unwrap().refused, 2);
        // A read that works proves nothing about writes.
        let seen = h.generation();
        h.observe(seen, Read, Ok(()));
        assert!(h.is_down());
        h.observe(seen, Write, Ok(()));
        assert!(!h.is_down());
        assert_eq!(gauge.get(), 1);
    }

    #[test]
    fn a_call_older_than_the_last_change_changes_nothing() {
        let (h, _) = health();
        let before = h.generation();
        h.observe(before, Write, Err(&down()));
        // A write that started before the outage and succeeded late.
        h.observe(before, Write, Ok(()));
        assert!(h.is_down());
        let during = h.generation();
        h.observe(during, Write, Ok(()));
        assert!(!h.is_down());
        // An error of a call that started during the outage.
        h.observe(during, Write, Err(&down()));
        assert!(!h.is_down());
    }

    #[test]
    fn passwords_of_either_form_are_found() {
        assert_eq!(
            url_password("postgres://a:b%40c@h/d").as_deref(),
            Some("b%40c")
        );
        assert_eq!(
            url_password("postgres://a@h/d?sslmode=require&password=xy").as_deref(),
            Some("xy")
        );
        assert_eq!(url_password("sqlite://data/x.db"), None);
    }
}
