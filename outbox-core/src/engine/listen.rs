//! The LISTEN loop: one dedicated connection per engine on `outbox_<table>`,
//! waking only the subscribers that serve the notified queue.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::SubShared;
use super::backoff::Reconnect;
use super::health::ListenStatus;

const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn run(
    opts: PgConnectOptions,
    channel: String,
    subs: Vec<Arc<SubShared>>,
    stop: CancellationToken,
    status: Arc<ListenStatus>,
) {
    let mut reconnect = Reconnect::default();
    let mut warned = false;
    let wake_all = || subs.iter().for_each(|s| s.wake.notify_one());
    loop {
        if stop.is_cancelled() {
            return;
        }
        match open(&opts, &channel).await {
            Ok((mut listener, pid)) => {
                // LISTEN works on it: a later incident starts over.
                reconnect.worked();
                status.connected(pid);
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
                        // Connection lost: the listener reconnects on its
                        // next use (the pid probe); catch up.
                        Ok(Ok(None)) => {
                            status.down("the LISTEN connection was lost; reconnecting".to_owned());
                            wake_all();
                            match backend_pid(&mut listener, &channel).await {
                                Some(pid) => status.connected(Some(pid)),
                                None => {
                                    tracing::warn!(channel = %channel, "LISTEN connection lost; polling until it is back");
                                    warned = true;
                                    break;
                                }
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(channel = %channel, "LISTEN connection failed: {e}; polling until it is back");
                            status.down(format!("the LISTEN connection failed: {e}"));
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
                                status.down(
                                    "the LISTEN connection did not answer a probe".to_owned(),
                                );
                                warned = true;
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                status.down(format!("cannot LISTEN: {e}"));
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

/// The server process of the listener's connection (connecting it again,
/// and LISTENing again, if it was lost); `None` if it fails. LISTENs once
/// more after the probe: a session's last statement stays its LISTEN (what
/// `pg_stat_activity.query` shows; LISTEN twice is a no-op).
async fn backend_pid(listener: &mut PgListener, channel: &str) -> Option<i32> {
    let probe = async {
        let pid = sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(&mut *listener)
            .await?;
        listener.listen(channel).await?;
        Ok::<_, sqlx::Error>(pid)
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, probe).await {
        Ok(Ok(pid)) => Some(pid),
        _ => None,
    }
}

async fn open(
    opts: &PgConnectOptions,
    channel: &str,
) -> Result<(PgListener, Option<i32>), sqlx::Error> {
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
    // The server process, for health reports (before LISTEN: a session's
    // last statement stays its LISTEN, what `pg_stat_activity` shows).
    let pid = sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
        .fetch_one(&mut listener)
        .await
        .ok();
    listener.listen(channel).await?;
    Ok((listener, pid))
}
