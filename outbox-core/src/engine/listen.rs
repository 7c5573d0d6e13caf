//! The LISTEN loop: one dedicated connection per engine on `outbox_<table>`,
//! waking only the subscribers that serve the notified queue.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::SubShared;
use super::backoff::Reconnect;

const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn run(
    opts: PgConnectOptions,
    channel: String,
    subs: Vec<Arc<SubShared>>,
    stop: CancellationToken,
) {
    let mut reconnect = Reconnect::default();
    let mut warned = false;
    let wake_all = || subs.iter().for_each(|s| s.wake.notify_one());
    loop {
        if stop.is_cancelled() {
            return;
        }
        match open(&opts, &channel).await {
            Ok(mut listener) => {
                // LISTEN works on it: a later incident starts over.
                reconnect.worked();
                if std::mem::take(&mut warned) {
                    tracing::info!(channel = %channel, "LISTEN restored");
                }
                // Notifications sent while we were not listening are lost:
                // make every subscriber look once.
                wake_all();
                loop {
                    let received = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = tokio::time::timeout(HEALTH_INTERVAL, listener.try_recv()) => r,
                    };
                    match received {
                        Ok(Ok(Some(n))) => {
                            let queue = n.payload();
                            for s in &subs {
                                if queue.is_empty() || s.sub.queues().iter().any(|q| q == queue) {
                                    s.wake.notify_one();
                                }
                            }
                        }
                        // Connection lost and re-established: catch up.
                        Ok(Ok(None)) => wake_all(),
                        Ok(Err(e)) => {
                            tracing::warn!(channel = %channel, "LISTEN connection failed: {e}; polling until it is back");
                            warned = true;
                            break;
                        }
                        Err(_idle) => {
                            let probe = sqlx::query("SELECT 1").execute(&mut listener);
                            if !matches!(
                                tokio::time::timeout(HEALTH_TIMEOUT, probe).await,
                                Ok(Ok(_))
                            ) {
                                tracing::warn!(channel = %channel, "LISTEN connection unresponsive; reconnecting (polling meanwhile)");
                                warned = true;
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                if warned {
                    tracing::debug!(channel = %channel, "LISTEN setup failed again: {e}");
                } else {
                    tracing::warn!(channel = %channel, "LISTEN setup failed; falling back to polling: {e}");
                    warned = true;
                }
            }
        }
        let wait = reconnect.failed();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn open(opts: &PgConnectOptions, channel: &str) -> Result<PgListener, sqlx::Error> {
    // A private one-connection pool: the listener never takes a connection
    // from the application's pool, and reconnects through it.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_lazy_with(opts.clone());
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(channel).await?;
    Ok(listener)
}
