//! What request handlers share ([`AppState`]). It sits below the app
//! builder and every handler (ingest, admin, reload, the console), so they
//! depend on it and never on each other or on `app`.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Notify;

use crate::clock::SharedClock;
use crate::dispatch::status::DispatchStatus;
use crate::pipeline::Pipeline;
use crate::settings::Settings;
use crate::store::health::StoreHealth;
use crate::store::Store;
use crate::telemetry::{Metrics, QueueGaugeSource, RefusalLog};

/// What request handlers share.
pub struct AppState {
    /// The configuration in force; a reload swaps it whole.
    pub pipeline: Arc<ArcSwap<Pipeline>>,
    pub store: Arc<dyn Store>,
    /// Whether the store is up; every call through `store` feeds it.
    pub store_health: Arc<StoreHealth>,
    pub clock: SharedClock,
    /// Tells the dispatcher new work is queued.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Where `/metrics` reads the queue's gauges.
    pub queue_gauges: QueueGaugeSource,
    /// Refused webhooks, logged without letting a flood flood the log.
    pub refusals: RefusalLog,
    /// What the dispatcher publishes of each business (pause, key, quota).
    pub dispatch: Arc<DispatchStatus>,
    /// Reads the configuration again for a reload.
    pub loader: SettingsLoader,
    pub reload: ReloadState,
}

/// Reads the settings again (files and environment, plus whatever the
/// caller overrides in code, as the demo and tests do).
pub type SettingsLoader = Arc<dyn Fn() -> Result<Settings, Vec<String>> + Send + Sync>;

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    pub last_attempt_at: Option<String>,
    /// Why the last reload was refused; `None` when it was applied.
    pub last_error: Option<Vec<String>>,
}

pub struct ReloadState {
    pub status: Mutex<ReloadStatus>,
    /// One reload at a time.
    pub(crate) running: tokio::sync::Mutex<()>,
    /// The settings the process started with: what a reload cannot change.
    pub(crate) running_with: Settings,
}

impl ReloadState {
    pub fn new(started_with: Settings) -> Self {
        Self {
            status: Mutex::default(),
            running: tokio::sync::Mutex::default(),
            running_with: started_with,
        }
    }
}
