//! Builds the service: binds the HTTP listener (port 0 works), opens the
//! store, starts the dispatcher, and hands back the address and a future
//! that runs until the server is stopped (zero-to-production's
//! `Application::build` / `run_until_stopped`). Everything is created once
//! here and passed in; there are no globals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::dev::Service;
use actix_web::{web, App, HttpResponse, HttpServer};
use arc_swap::ArcSwap;
use serde_json::json;
use tokio::sync::Notify;

use crate::api_error::ApiError;
use crate::clock::SharedClock;
use crate::pipeline::Pipeline;
use crate::reload;
use crate::settings::Settings;
pub use crate::state::AppState;
use crate::state::{ReloadState, SettingsLoader};
use crate::telemetry::{Metrics, QueueGaugeSource, RefresherHandle};
use crate::{admin, dispatch, ingest, ui};

pub struct Application {
    addr: SocketAddr,
    server: actix_web::dev::Server,
    handle: ServerHandle,
    pub state: web::Data<AppState>,
    dispatcher: dispatch::DispatcherHandle,
    /// The background reading of the queue's gauges (PostgreSQL only).
    gauge_refresher: Option<RefresherHandle>,
    handle_signals: bool,
    _watcher: Option<notify::RecommendedWatcher>,
    /// Held until `run_until_stopped` ends: no second process on the database.
    serve_lock: Option<crate::store::ServeLock>,
}

pub struct BuildOptions {
    pub clock: SharedClock,
    /// Let actix stop the server on SIGINT/SIGTERM, and reload on SIGHUP
    /// (the `serve` command).
    pub handle_signals: bool,
    /// How a reload reads the configuration; `None`: the files and
    /// environment the pipeline was loaded from.
    pub loader: Option<SettingsLoader>,
}

impl Application {
    /// Must be called inside an actix system: the dispatcher starts on the
    /// current thread.
    pub fn build(pipeline: Pipeline, options: BuildOptions) -> anyhow::Result<Self> {
        let settings = &pipeline.settings;
        // Before the store opens: a second process must not even migrate.
        // (None for PostgreSQL: any number of processes share it.)
        let url = crate::store::redact_url(&settings.storage.url);
        let serve_lock = crate::store::lock_for_serving(&settings.storage.url)
            .map_err(|e| anyhow::anyhow!("storage.url {url:?}: {e}"))?;
        let store = crate::store::open(&settings.storage)
            .map_err(|e| anyhow::anyhow!("storage.url {url:?}: {e}"))?;
        let metrics = Arc::new(Metrics::new());
        let store_health = Arc::new(crate::store::health::StoreHealth::new(
            options.clock.clone(),
            metrics.store_up.clone(),
            &settings.storage.url,
        ));
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::health::Watched::new(
            store,
            store_health.clone(),
        ));
        let ping_timeout = Duration::from_secs(settings.storage.connect_timeout_secs.max(1));
        let listen = settings.server.listen.clone();
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            n => n,
        };
        let shutdown_timeout = settings.server.shutdown_timeout_secs;
        let client_request_timeout = settings.server.client_request_timeout_ms;
        let keep_alive = settings.server.keep_alive_secs;
        let max_connections = settings.server.max_connections;
        let watch = settings.server.watch_config;
        let gauge_refresh = Duration::from_millis(settings.storage.gauge_refresh_ms);
        let loader = options.loader.unwrap_or_else(|| {
            let dir = settings.config_dir.clone();
            Arc::new(move || Settings::load(&dir).map_err(|e| vec![e.to_string()]))
        });
        let started_with = settings.clone();
        let pipeline = Arc::new(ArcSwap::from_pointee(pipeline));
        let wake = Arc::new(Notify::new());
        let (queue_gauges, gauge_refresher) =
            QueueGaugeSource::start(store.clone(), options.clock.clone(), gauge_refresh);
        let dispatch_status = Arc::new(dispatch::status::DispatchStatus::default());
        let state = web::Data::new(AppState {
            pipeline: pipeline.clone(),
            store: store.clone(),
            store_health: store_health.clone(),
            clock: options.clock.clone(),
            wake: wake.clone(),
            metrics: metrics.clone(),
            queue_gauges,
            refusals: Default::default(),
            dispatch: dispatch_status.clone(),
            loader,
            reload: ReloadState::new(started_with),
        });
        let data = state.clone();
        let market_settings = state.reload.running_with.market.clone();
        let campaign_locks = ingest::market::CampaignLocks::default();
        let server = HttpServer::new(move || {
            // awc's client is !Send: each worker makes its own.
            let lookup = web::Data::new(ingest::market::CampaignLookup::new(
                &market_settings,
                campaign_locks.clone(),
            ));
            App::new()
                .wrap_fn(|req, srv| {
                    // A bug must cost one request, never the worker: a
                    // panic becomes an opaque 500 and the service lives on.
                    use futures_util::FutureExt;
                    std::panic::AssertUnwindSafe(srv.call(req))
                        .catch_unwind()
                        .map(|outcome| match outcome {
                            Ok(response) => response,
                            Err(_) => Err(ApiError::internal("a request handler panicked").into()),
                        })
                })
                .app_data(data.clone())
                .app_data(lookup)
                .app_data(web::JsonConfig::default().error_handler(|err, _| {
                    ApiError::bad_request(format!("invalid JSON body: {err}")).into()
                }))
                .app_data(web::QueryConfig::default().error_handler(|err, _| {
                    ApiError::bad_request(format!("invalid query: {err}")).into()
                }))
                .app_data(web::PathConfig::default().error_handler(|err, _| {
                    ApiError::bad_request(format!("invalid path: {err}")).into()
                }))
                .route("/hooks/{source}", web::post().to(ingest::receive))
                .route(
                    "/hooks/{source}/notification",
                    web::post().to(ingest::market::receive),
                )
                .route("/healthz", web::get().to(healthz))
                .route(
                    "/readyz",
                    web::get().to(move |state| readyz(state, ping_timeout)),
                )
                .route("/metrics", web::get().to(metrics_text))
                .service(admin::scope())
                .service(ui::scope())
                .default_service(web::to(not_found))
        })
        .workers(workers)
        .shutdown_timeout(shutdown_timeout)
        .client_request_timeout(Duration::from_millis(client_request_timeout))
        .keep_alive(Duration::from_secs(keep_alive))
        .max_connections(max_connections)
        .bind(&listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (server.listen): {e}"))?;
        // Signals are ours (see run_until_stopped), so the dispatcher
        // stops together with the HTTP server.
        let server = server.disable_signals();
        if options.handle_signals {
            reload::on_sighup(state.clone());
        }
        let watcher = if watch {
            reload::watch(state.clone())
        } else {
            None
        };
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        let dispatcher = dispatch::spawn(
            store,
            pipeline,
            options.clock,
            wake,
            metrics,
            dispatch_status,
            store_health,
        );
        Ok(Self {
            addr,
            server,
            handle,
            state,
            dispatcher,
            gauge_refresher,
            handle_signals: options.handle_signals,
            _watcher: watcher,
            serve_lock,
        })
    }

    /// Stops the dispatcher for good; the service keeps accepting webhooks
    /// and answering the admin API. For tests of several instances on one
    /// database where one of them only accepts work.
    pub fn stop_dispatcher(&self) {
        self.dispatcher.stop();
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops the server from outside (tests, the demo).
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until stopped (a signal or `handle().stop()`), then stops the
    /// dispatcher: in-flight sends finish or go back to the queue.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Application {
            server,
            handle,
            dispatcher,
            gauge_refresher,
            handle_signals,
            serve_lock,
            ..
        } = self;
        let mut server = std::pin::pin!(server);
        let signal = async {
            if handle_signals {
                stop_signal().await
            } else {
                std::future::pending().await
            }
        };
        let served = tokio::select! {
            served = &mut server => served,
            name = signal => {
                // Stop claiming at once, while the HTTP server drains, so the
                // whole shutdown fits in one server.shutdown_timeout_secs.
                tracing::info!(signal = name, "stopping: no new webhooks or sends; finishing what is in flight");
                dispatcher.stop();
                let (served, ()) = tokio::join!(server, handle.stop(true));
                served
            }
        };
        tracing::info!("HTTP server stopped; finishing in-flight sends");
        dispatcher.shutdown().await;
        if let Some(refresher) = gauge_refresher {
            refresher.stop();
        }
        // Released only now, once this process no longer sends.
        drop(serve_lock);
        served
    }
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            return tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready when the store takes a write within `ping_timeout`
/// (`storage.connect_timeout_secs`, so an unreachable database is reported
/// promptly) and a configuration is loaded; names the configuration in
/// force and the last reload's failure, if any. Not ready: 503 with why
/// the store is unavailable and since when.
async fn readyz(state: web::Data<AppState>, ping_timeout: Duration) -> HttpResponse {
    let version = state.pipeline.load().version.clone();
    let reload = state
        .reload
        .status
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let seen = state.store_health.generation();
    let pinged = match tokio::time::timeout(ping_timeout, state.store.ping()).await {
        Ok(result) => result,
        Err(_) => {
            let e = crate::store::StoreError::Unavailable(format!(
                "no answer within {} s (storage.connect_timeout_secs)",
                ping_timeout.as_secs()
            ));
            state.store_health.failed(seen, &e);
            Err(e)
        }
    };
    match pinged {
        Ok(()) => HttpResponse::Ok().json(json!({
            "status": "ready", "config_version": version, "reload": reload
        })),
        Err(e) => {
            let outage = state.store_health.outage();
            HttpResponse::ServiceUnavailable().json(json!({
                "status": "unavailable",
                "config_version": version,
                "reload": reload,
                "store": e.to_string(),
                "store_unavailable_since": outage.as_ref().map(|o| crate::clock::to_rfc3339(o.since)),
                "refused_webhooks": outage.map(|o| o.refused),
            }))
        }
    }
}

/// Prometheus text. The queue's gauges come from `telemetry::gauges`
/// (never a count of the queue at scrape time); while the store is
/// unavailable they are left out or, on PostgreSQL, shown as last read
/// (and `chatbridge_store_up` is 0), so the scrape itself still answers.
async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    state.queue_gauges.publish(&state.metrics).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(
        "no such endpoint; see README \"HTTP API\"",
    ))
}
