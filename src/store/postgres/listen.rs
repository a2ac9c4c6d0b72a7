//! Wake-ups across the processes on one PostgreSQL database (LISTEN/NOTIFY).
//!
//! Whatever makes work due (an accepted event with queued deliveries, a
//! requeue, a release, a recorded answer, a reclaimed lease, released held
//! deliveries) runs [`announce`] inside its own transaction: PostgreSQL
//! delivers a notification only when that transaction commits, so a woken
//! dispatcher always finds the work visible.
//!
//! Each dispatching process keeps one connection of its own, outside the
//! pool (a pooled connection is handed to others and recycled), LISTENing
//! on [`CHANNEL`] and waking its dispatcher on every notification. A
//! notification sent while that connection is down is lost, not queued:
//! when it drops, [`listen`] reconnects with capped backoff and, once
//! LISTEN is back, wakes the dispatcher once more so it rescans the queue
//! and finds what became due during the gap. The dispatcher's polling
//! (`dispatch.poll_interval_ms`) stays as the last fallback.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use super::db_error;
use crate::store::StoreResult;

/// The channel every instance of one database listens on.
pub const CHANNEL: &str = "chatbridge_work";
/// First wait before reconnecting; doubles per failure up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(10);
/// TCP keepalive on the listener: an idle connection to a vanished server
/// is noticed in about this long (plus the system's probes), not hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Tells every listening process that the business (or, for `None`, some
/// business) has work due. Call inside the transaction that made it due.
pub(super) async fn announce(c: &impl GenericClient, business: Option<i64>) -> StoreResult<()> {
    let payload = business.map(|b| b.to_string()).unwrap_or_default();
    c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Keeps a LISTEN connection open for as long as the store's runtime
/// lives, waking `wake` on every notification and after every (re)connect.
pub(super) async fn listen(
    mut config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    wake: Arc<Notify>,
) {
    config.keepalives_idle(KEEPALIVE_IDLE);
    let mut retry = FIRST_RETRY;
    let mut was_up = false;
    loop {
        let why = match config.connect(tls.clone()).await {
            Err(e) => db_error(e).to_string(),
            Ok((client, mut connection)) => {
                // The connection object carries the notifications; it must
                // be polled while the LISTEN statement runs, and after.
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let notified = wake.clone();
                let receive = async move {
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) => notified.notify_one(),
                            Ok(_) => {}
                            Err(e) => return db_error(e).to_string(),
                        }
                    }
                    "the server closed the connection".to_owned()
                };
                let session = async {
                    if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                        return db_error(e).to_string();
                    }
                    if was_up {
                        tracing::info!("work notifications are back; rescanning the queue");
                    }
                    was_up = true;
                    retry = FIRST_RETRY;
                    // What became due while nobody listened sent nothing.
                    wake.notify_one();
                    // Holding the client keeps the connection open.
                    std::future::pending::<String>().await
                };
                tokio::select! {
                    why = receive => why,
                    why = session => why,
                }
            }
        };
        // One WARN per loss (the store's own health reports an outage);
        // the retries that follow are quiet.
        if retry == FIRST_RETRY {
            tracing::warn!(
                error = %why,
                "the connection that receives work notifications from other instances is down; reconnecting (until then this instance polls)"
            );
        } else {
            tracing::debug!(error = %why, retry_in_ms = retry.as_millis() as u64, "work notifications: reconnecting");
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}
