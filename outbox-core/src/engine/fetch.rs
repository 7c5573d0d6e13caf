//! The fetch loop: one per subscriber, on its own connection. Claims rows into
//! the bounded in-memory buffer the workers drain.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::SubShared;
use super::backoff::{self, Reconnect};
use super::store;
use crate::message::Delivery;

pub(crate) async fn run(shared: Arc<SubShared>) {
    let mut reconnect = Reconnect::default();
    let stop = shared.stop_fetch.clone();
    'connect: loop {
        if stop.is_cancelled() {
            return;
        }
        let mut conn = match store::connect(&shared.fetch_opts).await {
            Ok(c) => c,
            Err(e) => {
                let wait = reconnect.failed();
                tracing::error!(
                    subscriber = %shared.sub.name(),
                    "outbox fetch loop cannot connect: {e}; retrying in {wait:.1?}"
                );
                if shared.sleep_or_stop(wait).await {
                    return;
                }
                continue 'connect;
            }
        };
        reconnect.opened();
        let mut idle: u32 = 0;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let free = shared.tx.capacity();
            if free < shared.refill_at {
                // Workers wake us as soon as enough slots are free.
                if shared.wait(shared.opts().get_min_fetch_interval()).await {
                    return;
                }
                continue;
            }
            let token = Uuid::new_v4();
            let claimed = store::claim(
                shared.broker.stmts(),
                &mut conn,
                shared.sub.queues(),
                free,
                shared.opts().get_lease_ttl(),
                token,
            )
            .await;
            match claimed {
                Ok(rows) => {
                    let n = rows.len();
                    shared.metrics.fetched(n);
                    for row in rows {
                        let delivery = Arc::new(Delivery::new(row, token));
                        if let Err(e) = shared.tx.try_send(delivery) {
                            // Cannot happen (only this task sends, and never
                            // more than `free`); the lease would expire anyway.
                            tracing::error!("outbox buffer refused a claimed row: {e}");
                        }
                    }
                    if n > 0 {
                        tracing::debug!(subscriber = %shared.sub.name(), count = n, "claimed");
                        idle = 0;
                        continue;
                    }
                    idle = (idle + 1).min(30);
                    let wait = backoff::compute(
                        idle,
                        shared.opts().get_min_fetch_interval(),
                        shared.opts().get_max_fetch_interval(),
                    );
                    if shared.wait(wait).await {
                        return;
                    }
                }
                Err(e) => {
                    let wait = if store::is_connection_error(&e) {
                        reconnect.failed()
                    } else {
                        // A refused statement (schema drift, permissions):
                        // slow down, but keep trying.
                        reconnect.failed().max(Duration::from_secs(1))
                    };
                    tracing::error!(
                        subscriber = %shared.sub.name(),
                        "outbox fetch loop error: {e}; reconnecting in {wait:.1?}"
                    );
                    if shared.sleep_or_stop(wait).await {
                        return;
                    }
                    continue 'connect;
                }
            }
        }
    }
}
