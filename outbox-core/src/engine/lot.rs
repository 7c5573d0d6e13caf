//! [`ClaimMode::Transaction`](crate::ClaimMode::Transaction): lots.
//!
//! A lot is one claim's transaction. Its loop (`fetch_concurrency` of them
//! per subscriber, each on its own connection) opens a transaction, claims
//! up to `fetch_batch_size` rows locked `FOR UPDATE SKIP LOCKED` without
//! writing a lease, runs all their handlers at once, and writes every
//! outcome (one statement per kind: deletes, retries, dead-letter moves) in
//! the same transaction before committing. Nothing is written before the commit, so
//! a crash, a killed backend or a lost connection rolls the lot back and its
//! rows are claimable again at once.
//!
//! The transaction stays open at most `max_hold`: then the rows whose
//! handlers still run get a lease in it, it commits with the outcomes known
//! so far, and those rows finish as leased rows (their outcomes are written
//! under the lease token, as in [`ClaimMode::Lease`](crate::ClaimMode::Lease)).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use uuid::Uuid;

use super::SubShared;
use super::fetch::{Claimer, Flow};
use super::message::{Delivery, Outcome};
use super::worker::{self, Handled};
use crate::broker::Step;
use crate::error::Result;
use crate::store::OutboxRow;
use crate::store::conn::{self as store, Conn, LotWrites};

/// What one handler task of a lot gave.
enum Done {
    Handled(Handled),
    /// Never started: the subscriber is stopping.
    Unstarted(Arc<Delivery>),
}

/// One lot loop: claims, handles and commits lots until the subscriber
/// stops claiming.
pub(crate) async fn run(shared: Arc<SubShared>) {
    let mut c = Claimer::new(shared.clone());
    let limit = shared.opts().get_fetch_batch_size();
    loop {
        match c.ready().await {
            Flow::Go => {}
            Flow::Again => continue,
            Flow::Stop => return,
        }
        let with_expired = c.scan_expired();
        let Some(conn) = c.conn.as_mut() else {
            continue;
        };
        let claimed = claim(&shared, conn, limit, with_expired).await;
        match claimed {
            Ok((_, rows)) if rows.is_empty() => {
                if c.empty().await {
                    return;
                }
            }
            Ok((lot, rows)) => {
                if rows.len() >= limit {
                    // More may be waiting: another lot loop claims now,
                    // while this one's handlers run.
                    shared.wake.notify_one();
                }
                tracing::debug!(subscriber = %shared.sub.name(), count = rows.len(), "claimed a lot");
                match handle_lot(&shared, conn, lot, rows).await {
                    Ok(()) => c.worked(),
                    Err(e) => {
                        if c.failed(e).await {
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                if c.failed(e).await {
                    return;
                }
            }
        }
    }
}

/// Opens a lot on `conn` and claims its rows (none: the transaction is
/// already over), reporting the claim.
async fn claim(
    shared: &SubShared,
    conn: &mut Conn,
    limit: usize,
    with_expired: bool,
) -> std::result::Result<(u64, Vec<OutboxRow>), sqlx::Error> {
    shared.claim_begins();
    let cursor = shared.key_cursor();
    let args = store::ClaimArgs {
        ordered: cursor.as_deref(),
        ..shared.claim_args(limit, with_expired)
    };
    let claimed = store::lot_claim(shared.broker.stmts(), conn, &args).await;
    match claimed {
        Ok((lot, mut rows)) => {
            counted(&mut rows);
            shared.claim_ends(&rows);
            shared.metrics.fetched(rows.len());
            Ok((lot, rows))
        }
        Err(e) => {
            shared.claim_ends(&[]);
            Err(e)
        }
    }
}

/// One round of synchronous dispatch for a lot subscriber: one lot on
/// `conn`, its handlers run one after the other in the caller's task.
/// Returns how many deliveries ran.
pub(crate) async fn dispatch_round(shared: &Arc<SubShared>, conn: &mut Conn) -> Result<usize> {
    let limit = shared.opts().get_fetch_batch_size();
    let (lot, rows) = claim(shared, conn, limit, true).await?;
    let n = rows.len();
    if n == 0 {
        return Ok(0);
    }
    let token = Uuid::new_v4();
    let mut done = Vec::with_capacity(n);
    for row in rows {
        let d = Arc::new(Delivery::new(row, token));
        done.push(Handled::run(shared, d).await);
    }
    settle(shared, conn, lot, done, Vec::new(), Vec::new(), token).await?;
    Ok(n)
}

/// The claim did not count this delivery (a lot writes `deliveries_count`
/// with the outcome): the handler sees the count including it, as a leased
/// row's handler does.
pub(super) fn counted(rows: &mut [OutboxRow]) {
    for r in rows {
        r.deliveries_count += 1;
    }
}

/// Runs a claimed lot's handlers and ends its transaction. An error means
/// the lot could not commit (it was rolled back) and the connection is
/// suspect.
async fn handle_lot(
    shared: &Arc<SubShared>,
    conn: &mut Conn,
    lot: u64,
    rows: Vec<OutboxRow>,
) -> std::result::Result<(), sqlx::Error> {
    let token = Uuid::new_v4();
    let deadline = tokio::time::Instant::now() + shared.opts().get_max_hold();
    let mut pending: HashSet<i64> = rows.iter().map(|r| r.id).collect();
    // Every handler of the lot runs at once, as a future of this task,
    // started in claim order: a relay's publishes are all in flight
    // together, queued on the bus client in that order.
    let deliveries: Vec<Arc<Delivery>> = rows
        .into_iter()
        .map(|row| Arc::new(Delivery::new(row, token)))
        .collect();
    let mut running: FuturesUnordered<_> = deliveries
        .iter()
        .cloned()
        .map(|delivery| {
            let sh = shared.clone();
            async move {
                if sh.stop_fetch.is_cancelled() {
                    return Done::Unstarted(delivery);
                }
                Done::Handled(Handled::run(&sh, delivery).await)
            }
        })
        .collect();
    let mut done = Vec::with_capacity(pending.len());
    let mut unstarted = Vec::new();
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(sleep);
    let overdue = loop {
        tokio::select! {
            next = running.next() => match next {
                None => break false,
                Some(Done::Handled(h)) => {
                    pending.remove(&h.delivery.row.id);
                    done.push(h);
                }
                Some(Done::Unstarted(d)) => {
                    pending.remove(&d.row.id);
                    unstarted.push(d);
                }
            },
            () = &mut sleep => break true,
        }
    };
    let leased: Vec<i64> = if overdue {
        pending.into_iter().collect()
    } else {
        Vec::new()
    };
    if !leased.is_empty() {
        tracing::warn!(
            subscriber = %shared.sub.name(),
            rows = leased.len(),
            "outbox lot reached max_hold={:?} with handlers still running: their rows get a \
             lease (lease_ttl={:?}) and finish under it; the transaction commits now",
            shared.opts().get_max_hold(),
            shared.opts().get_lease_ttl(),
        );
    }
    // The leases are written at the lot's end, no earlier than this.
    let lease_start = std::time::Instant::now();
    let result = settle(shared, conn, lot, done, unstarted, leased.clone(), token).await;
    if leased.is_empty() {
        return result;
    }
    if result.is_err() {
        // Rolled back: the rows are claimable again without a lease, so
        // their late outcomes must not be written. Stop the handlers.
        drop(running);
        for d in deliveries.iter().filter(|d| leased.contains(&d.row.id)) {
            shared.finished(d, Step::Abandoned);
        }
        return result;
    }
    // The rest finish under their lease, like leased rows, which the
    // heartbeat extends until they are finished.
    let leased: HashSet<i64> = leased.into_iter().collect();
    for d in deliveries.iter().filter(|d| leased.contains(&d.row.id)) {
        shared.leases.track(d, lease_start);
    }
    drop(deliveries);
    let sh = shared.clone();
    let task = tokio::spawn(async move {
        while let Some(next) = running.next().await {
            match next {
                Done::Handled(h) => worker::record_leased(sh.clone(), h).await,
                Done::Unstarted(d) => worker::release_leased(&sh, &d).await,
            }
        }
    });
    let mut overdue = shared
        .overdue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    overdue.retain(|t| !t.is_finished());
    overdue.push(task);
    drop(overdue);
    result
}

/// Writes a lot's outcomes and commits (or, with nothing to write, ends the
/// transaction), then reports each row: its step, metrics and logs.
pub(super) async fn settle(
    shared: &SubShared,
    conn: &mut Conn,
    lot: u64,
    done: Vec<Handled>,
    unstarted: Vec<Arc<Delivery>>,
    leased: Vec<i64>,
    token: Uuid,
) -> std::result::Result<(), sqlx::Error> {
    let dlq = shared.broker.dlq().is_some();
    let mut writes = LotWrites {
        lease: leased,
        token,
        ..LotWrites::default()
    };
    // The rendered error of each terminal row (its dead letter's text).
    let mut texts: Vec<Option<String>> = Vec::with_capacity(done.len());
    // Queue chaining: the follow-on rows of the acked deliveries go into
    // the lot's transaction first (it deletes their inbound rows); a
    // delivery whose rows the database refuses fails instead, as a refused
    // publish would.
    let mut done = done;
    let (mut groups, mut owners) = (Vec::new(), Vec::new());
    for (i, h) in done.iter().enumerate() {
        if matches!(h.outcome, Outcome::Ack) {
            let rows = h.delivery.take_chained();
            if !rows.is_empty() {
                groups.push(rows);
                owners.push(i);
            }
        }
    }
    let mut inserted = match super::chain::insert_in_lot(conn, &groups).await {
        Ok((inserted, refused)) => {
            for (i, e) in owners.into_iter().zip(refused) {
                if let Some(e) = e {
                    let h = &mut done[i];
                    h.outcome = shared.follow_on_refused(&h.delivery.row, &*e);
                    h.error = Some(e);
                }
            }
            inserted
        }
        Err(e) => {
            if !store::is_connection_error(&e) {
                let _ = store::lot_end(shared.broker.stmts(), conn, lot, None).await;
            }
            return Err(rolled_back(
                shared,
                e,
                &done,
                &unstarted,
                writes.lease.len(),
            ));
        }
    };
    for h in &done {
        let id = h.delivery.row.id;
        let text = match h.outcome {
            Outcome::Terminal { .. } => h.error.as_deref().and_then(|e| shared.render(e)),
            _ => None,
        };
        match h.outcome {
            Outcome::Ack => writes.delete.push(id),
            Outcome::Retry { delay } => writes.retry.push((id, delay)),
            Outcome::Terminal { reason } if dlq => {
                writes.dead_letter.push((id, reason.as_str(), text.clone()));
            }
            Outcome::Terminal { .. } => writes.delete.push(id),
        }
        texts.push(text);
    }
    let ended = store::lot_end(shared.broker.stmts(), conn, lot, Some(&writes)).await;
    if ended.is_ok() {
        inserted.extend(super::chain::after_lot(conn, &groups));
        super::chain::landed(&inserted);
    }
    let refused = match ended {
        Ok(refused) => refused,
        Err(e) => {
            return Err(rolled_back(
                shared,
                e,
                &done,
                &unstarted,
                writes.lease.len(),
            ));
        }
    };
    for (h, text) in done.into_iter().zip(texts) {
        let row = &h.delivery.row;
        let kind = crate::instrument::error_kind(h.error.as_ref());
        let step = match h.outcome {
            Outcome::Ack => {
                shared.metrics.acked(&row.queue, h.duration);
                Step::Acked
            }
            Outcome::Retry { delay } => {
                shared.retried(row, delay, kind, h.duration, h.error.as_deref());
                Step::Retried { delay }
            }
            Outcome::Terminal { reason } if dlq => {
                if let Some(e) = &refused {
                    tracing::error!(
                        queue = %row.queue, row_id = row.id, reason = reason.as_str(),
                        "outbox row failed for good but the dead-letter table refused it ({e}); \
                         it stays leased and is delivered again after its lease expires"
                    );
                    shared.metrics.abandoned(&row.queue);
                    Step::Abandoned
                } else {
                    shared.dead_lettered(row, reason, kind, h.duration, text.as_deref());
                    Step::DeadLettered {
                        reason,
                        last_exception: text,
                    }
                }
            }
            Outcome::Terminal { reason } => {
                shared.deleting_terminal(row, reason, text.as_deref());
                shared
                    .metrics
                    .terminal(&row.queue, reason.as_str(), kind, h.duration, false);
                Step::Deleted { reason }
            }
        };
        shared.finished(&h.delivery, step);
    }
    if !unstarted.is_empty() {
        shared.released.fetch_add(unstarted.len(), SeqCst);
        tracing::info!(subscriber = %shared.sub.name(), released = unstarted.len(), "released unstarted rows");
    }
    for d in &unstarted {
        shared.finished(d, Step::Released);
    }
    Ok(())
}

/// A lot that could not commit (rolled back): reports its rows; returns the
/// error.
fn rolled_back(
    shared: &SubShared,
    e: sqlx::Error,
    done: &[Handled],
    unstarted: &[Arc<Delivery>],
    leased: usize,
) -> sqlx::Error {
    tracing::error!(
        subscriber = %shared.sub.name(),
        "outbox lot could not commit ({e}); it was rolled back: its {} rows are claimable \
         again (those already handled are delivered again)",
        done.len() + unstarted.len() + leased
    );
    for h in done {
        shared.metrics.abandoned(&h.delivery.row.queue);
        shared.finished(&h.delivery, Step::Abandoned);
    }
    for d in unstarted {
        shared.finished(d, Step::Released);
    }
    e
}
