//! Time as the service sees it. Everything time-dependent (quota windows,
//! backoff, leases, stored timestamps) reads an injected [`Clock`], so tests
//! can run hours of quota in milliseconds with a [`ManualClock`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
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
}

impl ManualClock {
    pub fn new(start: Millis) -> Arc<Self> {
        let (ticks, _) = tokio::sync::watch::channel(start);
        Arc::new(Self {
            now: AtomicI64::new(start),
            ticks,
        })
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
        Box::pin(async move {
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
