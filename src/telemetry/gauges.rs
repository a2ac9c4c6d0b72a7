//! The queue's gauges on `/metrics`: deliveries per state
//! (`chatbridge_deliveries`), and per business the waiting deliveries
//! (`chatbridge_queue_depth`) and the age of the oldest queued one
//! (`chatbridge_oldest_pending_age_seconds`).
//!
//! A scrape must stay cheap however long the queue is, so it never counts
//! deliveries:
//! - a store only this process changes (SQLite) keeps the counts up to date
//!   as states change (its `delivery_counts`), and a scrape reads them;
//! - a store other processes change too (PostgreSQL) would need a counter
//!   row that every instance writes, which serialises them; instead one task
//!   per process reads the counts from the database every
//!   `storage.gauge_refresh_ms` while `/metrics` is scraped (an instance no
//!   one has scraped for a minute does not count its queue), and a scrape
//!   shows the last reading, with `chatbridge_queue_gauges_age_seconds`
//!   saying how old it is (absent until the first reading). A failed
//!   reading keeps the last one, whose age then grows, and is tried again
//!   after a backoff.
//!
//! Ages are measured on the service's clock, as every stored time is.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::Metrics;
use crate::clock::{Millis, SharedClock};
use crate::store::{QueueGauges, Store, StoreError};

/// Errors in a row double the wait before the next reading, up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// No scrape for this long: the background reading pauses until the next.
const IDLE_AFTER: Duration = Duration::from_secs(60);

/// Where a scrape gets the queue's gauges from.
pub struct QueueGaugeSource {
    store: Arc<dyn Store>,
    clock: SharedClock,
    /// The background reading, for a store other processes change.
    background: Option<Arc<Background>>,
}

#[derive(Clone)]
struct Reading {
    gauges: Arc<QueueGauges>,
    taken_at: Millis,
}

/// What the scrapes and the background reading share.
#[derive(Default)]
struct Background {
    latest: Mutex<Option<Reading>>,
    last_scrape: Mutex<Option<Instant>>,
    /// A scrape came while the reading was paused.
    scraped: Notify,
}

impl Background {
    fn scraped_lately(&self) -> bool {
        self.last_scrape
            .lock()
            .map(|t| t.is_some_and(|t| t.elapsed() < IDLE_AFTER))
            .unwrap_or(true)
    }
}

/// Stops the background reading (dropping it does too).
pub struct RefresherHandle {
    stop: watch::Sender<bool>,
}

impl RefresherHandle {
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl QueueGaugeSource {
    /// For a store other processes change, starts the background reading
    /// on the current actix thread: one at once, then every `refresh`
    /// while `/metrics` is scraped.
    pub fn start(
        store: Arc<dyn Store>,
        clock: SharedClock,
        refresh: Duration,
    ) -> (Self, Option<RefresherHandle>) {
        if !store.changed_by_other_processes() {
            let source = Self {
                store,
                clock,
                background: None,
            };
            return (source, None);
        }
        let background = Arc::new(Background::default());
        let (stop, stopped) = watch::channel(false);
        actix_rt::spawn(refresh_loop(
            Arc::downgrade(&store),
            clock.clone(),
            Arc::downgrade(&background),
            refresh,
            stopped,
        ));
        let source = Self {
            store,
            clock,
            background: Some(background),
        };
        (source, Some(RefresherHandle { stop }))
    }

    /// Sets the queue's gauges in `metrics` for a scrape now. When the
    /// store cannot answer (SQLite), they are left out: `/metrics` still
    /// answers, with `chatbridge_store_up` saying why.
    pub async fn publish(&self, metrics: &Metrics) {
        let now = self.clock.now_ms();
        let reading = match &self.background {
            None => match self.store.queue_gauges().await {
                Ok(gauges) => Some(Reading {
                    gauges: Arc::new(gauges),
                    taken_at: now,
                }),
                Err(e) => {
                    log_failure(&e, "/metrics shows no queue gauges");
                    None
                }
            },
            Some(background) => {
                if let Ok(mut last) = background.last_scrape.lock() {
                    *last = Some(Instant::now());
                }
                background.scraped.notify_one();
                background.latest.lock().map(|r| r.clone()).unwrap_or(None)
            }
        };
        metrics.queue_depth.reset();
        metrics.oldest_pending_age.reset();
        metrics.queue_gauges_age.reset();
        let Some(reading) = reading else {
            // Nothing to show rather than zeros that lie.
            metrics.deliveries.reset();
            return;
        };
        for b in &reading.gauges.businesses {
            let label = b.business_id.to_string();
            metrics
                .queue_depth
                .with_label_values(&[&label])
                .set(b.queued + b.held);
            let age = b
                .oldest_queued_at
                .map(|t| (now - t).max(0) / 1000)
                .unwrap_or(0);
            metrics
                .oldest_pending_age
                .with_label_values(&[&label])
                .set(age);
        }
        for (state, n) in &reading.gauges.states {
            metrics
                .deliveries
                .with_label_values(&[state.as_str()])
                .set(*n);
        }
        metrics
            .queue_gauges_age
            .with_label_values(&[] as &[&str])
            .set((now - reading.taken_at).max(0) as f64 / 1000.0);
    }
}

/// An outage is logged once by `store::health`; anything else here.
fn log_failure(e: &StoreError, what_now: &str) {
    if !e.is_unavailable() {
        tracing::error!(error = %e, "cannot read the queue's gauges; {what_now}");
    }
}

/// Reads the gauges at once, then every `refresh` while scraped, until
/// stopped or until the store or the source is gone (the app was dropped
/// without stopping it).
async fn refresh_loop(
    store: Weak<dyn Store>,
    clock: SharedClock,
    background: Weak<Background>,
    refresh: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    let mut first = true;
    loop {
        let Some(shared) = background.upgrade() else {
            return;
        };
        if !first && !shared.scraped_lately() {
            // Paused: wait for a scrape (its notification stays if it
            // came meanwhile).
            tokio::select! {
                _ = shared.scraped.notified() => continue,
                _ = stopped.changed() => return,
            }
        }
        first = false;
        let Some(s) = store.upgrade() else { return };
        let taken_at = clock.now_ms();
        let result = s.queue_gauges().await;
        // Not held across the wait: the store closes when the app drops it.
        drop(s);
        let wait = match result {
            Ok(gauges) => {
                if let Ok(mut slot) = shared.latest.lock() {
                    *slot = Some(Reading {
                        gauges: Arc::new(gauges),
                        taken_at,
                    });
                }
                failures = 0;
                refresh
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = refresh
                    .saturating_mul(1 << failures.min(16))
                    .min(MAX_BACKOFF.max(refresh));
                log_failure(&e, "/metrics shows the last reading");
                wait
            }
        };
        drop(shared);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => return,
        }
    }
}
