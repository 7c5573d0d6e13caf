//! The engine as an [`Observer`] drives it ([`EngineHandle`]): wake-ups,
//! in-flight counts and synchronous dispatch, which only an observer that
//! drives the engine (the test harness) uses.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::Mutex;

use super::message::Delivery;
use super::{SubShared, worker};
use crate::broker::{EngineHandle, Observer};
use crate::error::Result;
use crate::store::conn as store;

/// A running engine's subscribers, as the broker's observer drives them
/// ([`EngineHandle`]).
pub(super) struct Attached {
    subs: Vec<Arc<SubShared>>,
    observer: Arc<dyn Observer>,
    /// Synchronous dispatch's connections, one per subscriber, kept between
    /// rounds.
    conns: Mutex<Vec<Option<store::Conn>>>,
}

impl EngineHandle for Attached {
    fn wake(&self, queue: Option<&str>) {
        for s in &self.subs {
            if queue.is_none_or(|q| s.sub.queues().iter().any(|x| x == q)) {
                s.wake.notify_one();
            }
        }
    }

    fn busy(&self) -> usize {
        self.subs.iter().map(|s| s.busy()).sum()
    }

    fn subscriptions(&self) -> Vec<(Vec<String>, Duration, bool)> {
        self.subs
            .iter()
            .map(|s| {
                let o = s.opts();
                (s.sub.queues().to_vec(), o.get_lease_ttl(), o.get_ordered())
            })
            .collect()
    }

    fn dispatch_round(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            let mut conns = self.conns.lock().await;
            conns.resize_with(self.subs.len(), || None);
            dispatch_round(&self.subs, &mut conns).await
        })
    }
}

impl Attached {
    pub(super) fn new(subs: Vec<Arc<SubShared>>, observer: Arc<dyn Observer>) -> Self {
        Self {
            subs,
            observer,
            conns: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn observer(&self) -> &Arc<dyn Observer> {
        &self.observer
    }
}

impl fmt::Debug for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attached")
            .field("subscribers", &self.subs.len())
            .finish_non_exhaustive()
    }
}

impl SubShared {
    /// Claims running plus deliveries in flight.
    pub(crate) fn busy(&self) -> usize {
        self.inflight.load(SeqCst) + self.claiming.load(SeqCst)
    }
}

/// One round of synchronous dispatch: each subscriber claims its due rows,
/// with the engine's claim, and delivers each one in the caller's task
/// through the workers' per-delivery pipeline. `conns` holds each
/// subscriber's connection between rounds. Returns how many deliveries ran.
async fn dispatch_round(
    subs: &[Arc<SubShared>],
    conns: &mut [Option<store::Conn>],
) -> Result<usize> {
    let mut total = 0;
    for (shared, slot) in subs.iter().zip(conns.iter_mut()) {
        let mut conn = match slot.take() {
            Some(c) => c,
            None => shared.broker.store_conn(&shared.conn_opts).await?,
        };
        if shared.in_lots() {
            let ran = super::lot::dispatch_round(shared, &mut conn).await;
            *slot = Some(conn);
            total += ran?;
            continue;
        }
        let token = uuid::Uuid::new_v4();
        shared.claim_begins();
        let cursor = shared.key_cursor();
        let args = store::ClaimArgs {
            queues: shared.sub.queues(),
            limit: shared.opts().get_fetch_batch_size(),
            lease_ttl: shared.opts().get_lease_ttl(),
            token,
            with_expired: true,
            ordered: cursor.as_deref(),
        };
        let claimed = store::claim(shared.broker.stmts(), &mut conn, &args).await;
        shared.claim_ends(claimed.as_deref().unwrap_or_default());
        let rows = claimed?;
        shared.metrics.fetched(rows.len());
        let mut conn = Some(conn);
        for row in rows {
            total += 1;
            worker::deliver(
                shared.clone(),
                Arc::new(Delivery::new(row, token)),
                &mut conn,
            )
            .await;
        }
        *slot = conn;
    }
    Ok(total)
}
