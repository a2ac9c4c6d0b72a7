//! Hot reload of settings, routes and templates: on a file change, on
//! SIGHUP and on `POST /admin/reload`. A new configuration is validated
//! whole, then checked against recent stored events: every event the
//! current configuration renders without failure must still render under
//! the new one (events that already fail do not block a fix). Only then
//! does it replace the old one, in one atomic swap; otherwise the old one
//! stays and the failure is logged, counted and shown by `/readyz`.
//! Handlers and sends take one snapshot of the configuration each, so no
//! piece of work sees two.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::clock::to_rfc3339;
use crate::pipeline::Pipeline;
use crate::settings::Settings;
pub use crate::state::{AppState, ReloadState, ReloadStatus, SettingsLoader};

/// How many recent events a reload renders under both configurations.
const REGRESSION_SAMPLE: usize = 500;
/// File events closer together than this make one reload.
const DEBOUNCE: Duration = Duration::from_millis(300);

#[derive(Debug, Serialize)]
pub struct Applied {
    pub config_version: String,
    pub changed: bool,
    /// Settings read only at start; a change to them waits for a restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub needs_restart: Vec<&'static str>,
}

pub async fn reload(state: &AppState, trigger: &str) -> Result<Applied, Vec<String>> {
    let _one_at_a_time = state.reload.running.lock().await;
    let outcome = try_reload(state).await;
    let now = to_rfc3339(state.clock.now_ms());
    let mut status = state
        .reload
        .status
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    status.last_attempt_at = Some(now);
    match &outcome {
        Ok(applied) => {
            status.last_error = None;
            state
                .metrics
                .config_reloads
                .with_label_values(&["applied"])
                .inc();
            tracing::info!(trigger, config_version = %applied.config_version, changed = applied.changed, "configuration reloaded");
            for key in &applied.needs_restart {
                tracing::warn!(
                    key,
                    "this setting differs from the value in effect and takes effect only after a restart"
                );
            }
        }
        Err(problems) => {
            status.last_error = Some(problems.clone());
            state
                .metrics
                .config_reloads
                .with_label_values(&["refused"])
                .inc();
            for p in problems {
                tracing::error!(trigger, problem = %p, "configuration reload refused; the previous configuration stays");
            }
        }
    }
    outcome
}

async fn try_reload(state: &AppState) -> Result<Applied, Vec<String>> {
    let settings = (state.loader)()?;
    let new = Pipeline::from_settings(settings)?;
    let old = state.pipeline.load_full();
    if new.version == old.version {
        return Ok(Applied {
            config_version: old.version.clone(),
            changed: false,
            needs_restart: Vec::new(),
        });
    }
    let recent = state
        .store
        .recent_events(REGRESSION_SAMPLE)
        .await
        .map_err(|e| {
            vec![format!(
                "cannot read recent events to check the new configuration: {e}"
            )]
        })?;
    let mut regressions = Vec::new();
    for event in &recent {
        let Ok(before) = old.plan_stored(event) else {
            continue;
        };
        if before.iter().any(|p| p.rendered.is_err()) {
            continue;
        }
        for planned in new.plan_stored(event).unwrap_or_default() {
            if let Err(why) = planned.rendered {
                regressions.push(format!(
                    "event {} ({} {:?}) renders now but not with the new configuration: route {:?}: {why}",
                    event.id, event.source, event.external_id, planned.route
                ));
            }
        }
    }
    if !regressions.is_empty() {
        regressions.truncate(20);
        return Err(regressions);
    }
    let needs_restart = startup_only_changes(&state.reload.running_with, &new.settings);
    let version = new.version.clone();
    state.pipeline.store(Arc::new(new));
    // A new key may free a held business: let the dispatcher look now.
    state.wake.notify_one();
    Ok(Applied {
        config_version: version,
        changed: true,
        needs_restart,
    })
}

/// The settings read only at start whose new value differs from the one
/// the process runs with: one key each. They are compared with the values
/// in effect since start, not with the last reload's, so changing a key
/// back says nothing, and a change still waiting is named again.
fn startup_only_changes(running: &Settings, new: &Settings) -> Vec<&'static str> {
    let (a, b) = (running, new);
    let checks: [(&'static str, bool); 14] = [
        ("server.listen", a.server.listen != b.server.listen),
        ("server.workers", a.server.workers != b.server.workers),
        ("storage.url", a.storage.url != b.storage.url),
        // The pool (and the listener) are built once, when the store opens.
        (
            "storage.pool_size",
            a.storage.pool_size != b.storage.pool_size,
        ),
        (
            "storage.connect_timeout_secs",
            a.storage.connect_timeout_secs != b.storage.connect_timeout_secs,
        ),
        (
            "storage.gauge_refresh_ms",
            a.storage.gauge_refresh_ms != b.storage.gauge_refresh_ms,
        ),
        (
            "server.client_request_timeout_ms",
            a.server.client_request_timeout_ms != b.server.client_request_timeout_ms,
        ),
        (
            "server.keep_alive_secs",
            a.server.keep_alive_secs != b.server.keep_alive_secs,
        ),
        (
            "server.max_connections",
            a.server.max_connections != b.server.max_connections,
        ),
        (
            "server.watch_config",
            a.server.watch_config != b.server.watch_config,
        ),
        (
            "server.shutdown_timeout_secs",
            a.server.shutdown_timeout_secs != b.server.shutdown_timeout_secs,
        ),
        ("log.format", a.log.format != b.log.format),
        ("market.base_url", a.market.base_url != b.market.base_url),
        (
            "market.request_timeout_secs",
            a.market.request_timeout_secs != b.market.request_timeout_secs,
        ),
    ];
    checks
        .into_iter()
        .filter(|(_, differs)| *differs)
        .map(|(key, _)| key)
        .collect()
}

/// Watches the configuration folder and the templates folder; each burst
/// of changes makes one reload. The returned watcher must be kept alive.
pub fn watch(state: actix_web::web::Data<AppState>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let pipeline = state.pipeline.load();
    let folders: Vec<PathBuf> = vec![
        pipeline.settings.config_dir.clone(),
        pipeline.settings.templates.dir.clone(),
    ];
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch configuration files; reload with SIGHUP or POST /admin/reload");
            return None;
        }
    };
    for folder in &folders {
        if let Err(e) = watcher.watch(folder, notify::RecursiveMode::Recursive) {
            tracing::warn!(folder = %folder.display(), error = %e, "cannot watch folder");
        }
    }
    actix_rt::spawn(async move {
        while rx.recv().await.is_some() {
            // Editors write in several steps; wait for the burst to end.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let _ = reload(&state, "file change").await;
        }
    });
    Some(watcher)
}

/// Reloads on SIGHUP (Unix).
pub fn on_sighup(state: actix_web::web::Data<AppState>) {
    #[cfg(unix)]
    actix_rt::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP");
            return;
        };
        while hangups.recv().await.is_some() {
            let _ = reload(&state, "SIGHUP").await;
        }
    });
}
