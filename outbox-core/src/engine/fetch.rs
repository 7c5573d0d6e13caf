//! The fetch loop: one per subscriber, on its own connection. Claims rows into
//! the bounded in-memory buffer the workers drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::SubShared;
use super::backoff::{self, Reconnect};
use crate::engine::message::Delivery;
use crate::store::conn as store;

/// The longest time between two claims that look for expired leases while
/// the queue is busy.
const MAX_EXPIRED_SCAN_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) async fn run(shared: Arc<SubShared>) {
    let mut reconnect = Reconnect::default();
    let stop = shared.stop_fetch.clone();
    'connect: loop {
        if stop.is_cancelled() {
            return;
        }
        let mut conn = match shared.broker.store_conn(&shared.fetch_opts).await {
            Ok(c) => c,
            Err(e) => {
                let wait = reconnect.failed();
                if backs_off(&shared, wait, "cannot connect", &e, "retrying").await {
                    return;
                }
                continue 'connect;
            }
        };
        let mut idle: u32 = 0;
        // Expired leases can only appear `lease_ttl` after a claim, so the
        // claim looks for them (a scan of the leased index, which holds every
        // in-flight row) at most every quarter lease while rows keep coming,
        // and on every poll once the queue is idle.
        let expired_every = (shared.opts().get_lease_ttl() / 4).min(MAX_EXPIRED_SCAN_INTERVAL);
        let mut last_expired_scan: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let free = shared.tx.capacity();
            // Reserve the slots this claim may fill, so that a concurrent
            // fetch loop of the same subscriber cannot claim them too.
            let permits = if free >= shared.refill_at {
                shared.tx.try_reserve_many(free).ok()
            } else {
                None
            };
            let Some(permits) = permits else {
                // Workers wake us as soon as enough slots are free.
                if shared.wait(shared.opts().get_min_fetch_interval()).await {
                    return;
                }
                continue;
            };
            let token = Uuid::new_v4();
            let with_expired =
                idle > 0 || last_expired_scan.is_none_or(|t| t.elapsed() >= expired_every);
            if with_expired {
                last_expired_scan = Some(Instant::now());
            }
            shared.claim_begins();
            let cursor = shared.key_cursor();
            let args = store::ClaimArgs {
                queues: shared.sub.queues(),
                limit: free,
                lease_ttl: shared.opts().get_lease_ttl(),
                token,
                with_expired,
                ordered: cursor.as_deref(),
            };
            let claimed = store::claim(shared.broker.stmts(), &mut conn, &args).await;
            shared.claim_ends(claimed.as_deref().unwrap_or_default());
            match claimed {
                Ok(rows) => {
                    // The connection works: a later incident starts its
                    // reconnect backoff from the minimum again.
                    reconnect.worked();
                    let n = rows.len();
                    shared.metrics.fetched(n);
                    // `rows.len() <= free`: a permit for each; unused ones
                    // return to the buffer when dropped.
                    for (row, permit) in rows.into_iter().zip(permits) {
                        permit.send(Arc::new(Delivery::new(row, token)));
                    }
                    if n > 0 {
                        tracing::debug!(subscriber = %shared.sub.name(), count = n, "claimed");
                        idle = 0;
                        continue;
                    }
                    idle = (idle + 1).min(30);
                    // Wake up when the earliest future-dated row becomes due
                    // (a delayed publish, another relay's retry), not only at
                    // the next poll.
                    match store::next_due(shared.broker.stmts(), &mut conn, shared.sub.queues())
                        .await
                    {
                        Ok(Some(after)) => shared.due_in(after),
                        Ok(None) => {}
                        Err(e) if store::is_connection_error(&e) => {
                            let wait = reconnect.failed();
                            let what = "lost its connection";
                            if backs_off(&shared, wait, what, &e, "reconnecting").await {
                                return;
                            }
                            continue 'connect;
                        }
                        Err(e) => tracing::warn!(
                            subscriber = %shared.sub.name(),
                            "outbox fetch loop cannot look up the next due row ({e}); polling instead"
                        ),
                    }
                    let wait = backoff::compute(
                        idle,
                        shared.opts().get_min_fetch_interval(),
                        shared.opts().get_max_fetch_interval(),
                    );
                    if shared.wait_idle(wait).await {
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
                    let e = with_schema_hint(e);
                    if backs_off(&shared, wait, "error", &e, "reconnecting").await {
                        return;
                    }
                    continue 'connect;
                }
            }
        }
    }
}

/// Logs why the fetch loop gives up its connection (`outbox fetch loop
/// {what}: {error}; {then} in {wait}`) and waits `wait`; `true` if stopping
/// meanwhile.
async fn backs_off(
    shared: &SubShared,
    wait: Duration,
    what: &str,
    error: &(dyn std::fmt::Display + Sync),
    then: &str,
) -> bool {
    tracing::error!(
        subscriber = %shared.sub.name(),
        "outbox fetch loop {what}: {error}; {then} in {wait:.1?}"
    );
    shared.sleep_or_stop(wait).await
}

/// A claim refused because the table predates a column (a faststream-outbox
/// table, or one created by an older version): says what to run.
fn with_schema_hint(e: sqlx::Error) -> String {
    let undefined_column =
        matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42703"));
    if undefined_column && e.to_string().contains("ordering_key") {
        format!(
            "{e} (the outbox table has no ordering_key column yet: run OutboxTable::migrate, \
             or `outbox migrate`, which adds it and its index; OutboxBroker::validate_schema \
             prints the DDL)"
        )
    } else {
        e.to_string()
    }
}
