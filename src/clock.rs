//! Time as the service sees it. Everything time-dependent (quota windows,
//! backoff, leases, stored timestamps) reads an injected [`Clock`], so tests
//! can run hours of quota in milliseconds with a [`ManualClock`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, the unit of every stored time.
pub type Millis = i64;

pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> Millis;
    /// Resolves once `now_ms() >= deadline`.
    fn sleep_until(&self, deadline: Millis) -> Sleep;
}

pub type SharedClock = Arc<dyn Clock>;

/// Wall-clock time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }

    fn sleep_until(&self, deadline: Millis) -> Sleep {
        let wait = (deadline - self.now_ms()).max(0) as u64;
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// A clock that moves only when told to. Sleepers wake when it passes
/// their deadline, whichever runtime or thread they are on.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
    ticks: tokio::sync::watch::Sender<Millis>,
    /// Deadlines of the sleeps now pending, so a test can jump straight to
    /// the next moment something is waiting for (as tokio's paused time does).
    sleepers: Arc<Mutex<BTreeMap<u64, Millis>>>,
    next_sleeper: AtomicU64,
}

/// Removes a sleep's deadline when the sleep ends or is dropped.
struct SleeperGuard {
    sleepers: Arc<Mutex<BTreeMap<u64, Millis>>>,
    id: u64,
}

impl Drop for SleeperGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sleepers.lock() {
            s.remove(&self.id);
        }
    }
}

impl ManualClock {
    pub fn new(start: Millis) -> Arc<Self> {
        let (ticks, _) = tokio::sync::watch::channel(start);
        Arc::new(Self {
            now: AtomicI64::new(start),
            ticks,
            sleepers: Arc::default(),
            next_sleeper: AtomicU64::new(0),
        })
    }

    /// The earliest deadline anyone is sleeping until, if any is in the future.
    pub fn next_deadline(&self) -> Option<Millis> {
        let now = self.now_ms();
        self.sleepers
            .lock()
            .ok()?
            .values()
            .copied()
            .filter(|&d| d > now)
            .min()
    }

    pub fn advance(&self, by: Duration) {
        let now =
            self.now.fetch_add(by.as_millis() as i64, Ordering::SeqCst) + by.as_millis() as i64;
        self.ticks.send_replace(now);
    }

    pub fn set(&self, to: Millis) {
        self.now.store(to, Ordering::SeqCst);
        self.ticks.send_replace(to);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }

    fn sleep_until(&self, deadline: Millis) -> Sleep {
        let mut ticks = self.ticks.subscribe();
        let id = self.next_sleeper.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.sleepers.lock() {
            s.insert(id, deadline);
        }
        let guard = SleeperGuard {
            sleepers: self.sleepers.clone(),
            id,
        };
        Box::pin(async move {
            let _guard = guard;
            while *ticks.borrow_and_update() < deadline {
                if ticks.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}

/// RFC 3339 rendering of a stored time, for API answers and logs.
pub fn to_rfc3339(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}
