//! Exactly-once lanes (`docs/exactly-once.md`): a subscriber with
//! `exactly_once(U)` runs one lane manager instead of fetch loops.
//!
//! The manager polls for free lanes: it takes a lane's PostgreSQL
//! **session** advisory lock on a connection of its own and hands the
//! connection to a lane task. The lane task opens the lane on the transport
//! (which fences every older owner and returns the ids of the lane's last
//! committed lot), deletes those ids, then loops: claim the lane's due rows
//! in id order in a transaction on the lock's connection, run their handlers
//! (their publishes are staged, [`crate::transport::lane`]), commit the
//! records of the successful rows plus the lot's progress in one bus
//! transaction, and only then write the lot's outcomes in PostgreSQL
//! (deletes, retries, dead letters) and commit. A lost lane (fenced, a fatal
//! bus error, an unknown commit outcome, a failed PostgreSQL statement)
//! drops its connection, which releases the lock; the manager takes the lane
//! again later, unless another relay took it first.
//!
//! Per-key order: a keyed row whose handler failed holds back the later rows
//! of its key in the same lot (they are released, not published), and the
//! lane's claim skips a keyed row while an earlier row of its key waits for
//! a retry, so a key's records reach the bus in id order. A dead-lettered
//! row lets its key go on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use super::SubShared;
use super::message::{Delivery, Outcome};
use super::worker::Handled;
use crate::broker::Step;
use crate::error::BoxError;
use crate::store::OutboxRow;
use crate::store::conn::Conn;
use crate::store::lane as store;
use crate::transport::lane::{self as stage, Stage};
use crate::transport::{Lane, LaneId, Lanes, LotOutcome};

/// How often the manager looks for free lanes.
const LANE_POLL: Duration = Duration::from_secs(1);

/// How long a lane that was given up waits before this relay takes it again.
const LANE_BACKOFF: Duration = Duration::from_secs(1);

/// The longest an idle lane waits before it claims again (a NOTIFY wakes
/// every idle lane at once; a retry that comes due does not).
const LANE_IDLE: Duration = Duration::from_millis(250);

/// An exactly-once subscriber's lanes: how many, and the transport that
/// publishes their lots.
#[derive(Clone)]
pub(crate) struct LaneSpec {
    /// `U`, the number of lanes.
    pub(crate) lanes: u32,
    /// The transport's name.
    pub(crate) transport: String,
    /// Its lanes.
    pub(crate) bus: Arc<dyn Lanes>,
}

impl std::fmt::Debug for LaneSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneSpec")
            .field("lanes", &self.lanes)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// The lane manager of one subscriber: takes free lanes, runs a task per
/// owned lane, and on stop waits for them to finish their lots.
pub(crate) async fn run(shared: Arc<SubShared>) {
    let Some(spec) = shared.sub.lanes().cloned() else {
        return;
    };
    let unit = format!("{}/{}", table_label(&shared), shared.sub.name());
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut owned: HashMap<tokio::task::Id, u32> = HashMap::new();
    let mut not_before: HashMap<u32, Instant> = HashMap::new();
    let mut spare: Option<Conn> = None;
    // A NOTIFY wakes one waiter of `shared.wake`: this loop, which wakes
    // every idle lane.
    let wake = Arc::new(Notify::new());
    let mut next_scan = Instant::now();
    loop {
        if shared.stop_fetch.is_cancelled() {
            break;
        }
        let now = Instant::now();
        if now < next_scan {
            tokio::select! {
                () = shared.stop_fetch.cancelled() => {}
                () = shared.wake.notified() => wake.notify_waiters(),
                () = tokio::time::sleep_until(next_scan) => {}
            }
            continue;
        }
        next_scan = now + LANE_POLL;
        let mine: HashSet<u32> = owned.values().copied().collect();
        for lane in 0..spec.lanes {
            if mine.contains(&lane) || not_before.get(&lane).is_some_and(|t| *t > now) {
                continue;
            }
            if spare.is_none() {
                match shared.broker.store_conn(&shared.fetch_opts).await {
                    Ok(c) => spare = Some(c),
                    Err(e) => {
                        tracing::warn!(subscriber = %shared.sub.name(), "outbox lanes: cannot connect to take a lane ({e}); trying again");
                        break;
                    }
                }
            }
            let Some(conn) = spare.as_mut() else { break };
            match store::try_lock(conn, &unit, lane).await {
                Ok(true) => {
                    let Some(conn) = spare.take() else { break };
                    let handle =
                        tasks.spawn(own(shared.clone(), spec.clone(), conn, lane, wake.clone()));
                    owned.insert(handle.id(), lane);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(subscriber = %shared.sub.name(), "outbox lanes: the lane lock failed ({e}); trying again");
                    spare = None;
                    break;
                }
            }
        }
        tokio::select! {
            () = shared.stop_fetch.cancelled() => {}
            () = shared.wake.notified() => wake.notify_waiters(),
            () = tokio::time::sleep_until(next_scan) => {}
            Some(ended) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match &ended {
                    Ok((id, ())) => *id,
                    Err(e) => e.id(),
                };
                if let Some(lane) = owned.remove(&id) {
                    not_before.insert(lane, Instant::now() + LANE_BACKOFF);
                }
            }
        }
    }
    drop(spare);
    while tasks.join_next().await.is_some() {}
}

/// The outbox table as lanes name it: `schema.table`, or `table`
/// (unquoted: the names are validated identifiers).
fn table_label(shared: &SubShared) -> String {
    let t = shared.broker.table();
    match t.schema_name() {
        Some(s) => format!("{s}.{}", t.name()),
        None => t.name().to_owned(),
    }
}

/// Owns lane `lane` while its lock's connection `conn` lives: drives it
/// until the subscriber stops or the lane is lost, then drops the
/// connection (the server releases the lock).
async fn own(shared: Arc<SubShared>, spec: LaneSpec, mut conn: Conn, lane: u32, wake: Arc<Notify>) {
    let name = shared.sub.name().to_owned();
    match drive(&shared, &spec, &mut conn, lane, &wake).await {
        Ok(()) => tracing::info!(subscriber = %name, lane, "outbox lane released (stopping)"),
        Err(e) => tracing::warn!(
            subscriber = %name, lane,
            "outbox lane given up: {e}; its lock is released and the lane is taken again (by \
             this relay or another one), which fences this owner and resumes after the last \
             committed lot"
        ),
    }
    drop(conn);
}

/// Opens the lane, deletes its last committed lot's rows, then handles lots
/// until stop (`Ok`) or the lane is lost (`Err`).
async fn drive(
    shared: &Arc<SubShared>,
    spec: &LaneSpec,
    conn: &mut Conn,
    lane: u32,
    wake: &Notify,
) -> Result<(), BoxError> {
    let stmts = &shared.broker.stmts().lane;
    let id = LaneId::new(table_label(shared), shared.sub.name(), lane, spec.lanes);
    let (mut bus, last) = spec.bus.open(id).await?;
    let deleted = store::delete(stmts, conn, &last).await?;
    tracing::info!(
        subscriber = %shared.sub.name(), lane, lanes = spec.lanes,
        last_lot = last.len(), deleted,
        "outbox lane taken (older owners fenced; {deleted} rows of the last committed lot were \
         still in the table and are deleted)"
    );
    let limit = shared.opts().get_fetch_batch_size();
    let idle = shared.opts().get_max_fetch_interval().min(LANE_IDLE);
    loop {
        if shared.stop_fetch.is_cancelled() {
            return Ok(());
        }
        // Listening before the claim: a NOTIFY of a row committed after the
        // claim's snapshot but before the lane waits must still wake it
        // (`notify_waiters` keeps no permit; missed, the row would wait the
        // idle interval).
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        shared.claim_begins();
        let t0 = Instant::now();
        let claimed = store::claim(
            stmts,
            conn,
            shared.sub.queues(),
            limit,
            shared.opts().get_lease_ttl(),
            spec.lanes,
            lane,
        )
        .await;
        let mut rows = match claimed {
            Ok(rows) => rows,
            Err(e) => {
                shared.claim_ends(&[]);
                return Err(e.into());
            }
        };
        super::lot::counted(&mut rows);
        shared.claim_ends(&rows);
        if rows.is_empty() {
            tokio::select! {
                () = shared.stop_fetch.cancelled() => return Ok(()),
                () = &mut woken => {}
                () = tokio::time::sleep(idle) => {}
            }
            continue;
        }
        shared.metrics.fetched(rows.len());
        let n = rows.len();
        let claimed_at = Instant::now();
        let t = handle_lot(shared, spec, conn, &mut *bus, rows).await?;
        tracing::debug!(
            subscriber = %shared.sub.name(), lane, rows = n,
            claim_ms = ms(claimed_at - t0),
            handlers_ms = ms(t.handled - claimed_at),
            bus_ms = ms(t.committed - t.handled),
            settle_ms = ms(t.settled - t.committed),
            "outbox lane lot"
        );
    }
}

/// Milliseconds, for the lot's debug line.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// When a lot's steps ended.
struct LotTimes {
    handled: Instant,
    committed: Instant,
    settled: Instant,
}

/// Runs a claimed lot's handlers, commits the records of its successful
/// rows with the lot's progress on the bus, then writes the outcomes in
/// PostgreSQL. `Err`: the lane is lost (nothing was written in PostgreSQL).
async fn handle_lot(
    shared: &Arc<SubShared>,
    spec: &LaneSpec,
    conn: &mut Conn,
    bus: &mut dyn Lane,
    rows: Vec<OutboxRow>,
) -> Result<LotTimes, BoxError> {
    let token = Uuid::nil();
    let deliveries: Vec<Arc<Delivery>> = rows
        .into_iter()
        .map(|row| Arc::new(Delivery::new(row, token)))
        .collect();
    let stages: Vec<Arc<Stage>> = deliveries
        .iter()
        .map(|_| Arc::new(Stage::default()))
        .collect();
    let handled: Vec<Handled> = join_all(
        deliveries
            .iter()
            .zip(&stages)
            .map(|(d, st)| stage::scope(st.clone(), Handled::run(shared, d.clone()))),
    )
    .await;
    // Id order (the claim's): a key's rows stay in order; a failed keyed
    // row holds back the later rows of its key.
    let mut blocked: HashSet<String> = HashSet::new();
    let mut done: Vec<Handled> = Vec::with_capacity(handled.len());
    let mut held: Vec<Arc<Delivery>> = Vec::new();
    let mut records = Vec::new();
    let mut owners = Vec::new();
    let mut ids = Vec::new();
    for (mut h, st) in handled.into_iter().zip(stages) {
        let staged = st.take();
        let key = h.delivery.row.ordering_key.clone();
        if key.as_ref().is_some_and(|k| blocked.contains(k)) {
            held.push(h.delivery.clone());
            continue;
        }
        if matches!(h.outcome, Outcome::Ack)
            && let Some((other, _)) = staged.iter().find(|(t, _)| *t != spec.transport)
        {
            let e: BoxError = format!(
                "exactly-once subscriber published to transport `{other}`; its lanes are on \
                 `{}` only",
                spec.transport
            )
            .into();
            h.outcome = shared.follow_on_refused(&h.delivery.row, &*e);
            h.error = Some(e);
        }
        if matches!(h.outcome, Outcome::Ack) {
            ids.push(h.delivery.row.id);
            for (_, m) in staged {
                records.push(m);
                owners.push(done.len());
            }
        } else if let Some(k) = key {
            blocked.insert(k);
        }
        done.push(h);
    }
    let handled_at = Instant::now();
    let mut aborted = false;
    if !records.is_empty() {
        match bus.commit(records, ids).await {
            Ok(LotOutcome::Committed) => {}
            Ok(LotOutcome::Refused { index, error }) => {
                aborted = true;
                let culprit = owners.get(index).copied();
                let (kept, released) = refused(shared, done, culprit, error);
                done = kept;
                held.extend(released);
            }
            Ok(LotOutcome::Aborted(e)) => {
                aborted = true;
                tracing::warn!(
                    subscriber = %shared.sub.name(),
                    "outbox lane: the bus aborted the lot's transaction ({e}); its rows are \
                     claimed again"
                );
                let (kept, released) = refused(shared, done, None, e);
                done = kept;
                held.extend(released);
            }
            Err(e) => {
                abandon(shared, &done, &held);
                return Err(e);
            }
        }
    }
    let committed = Instant::now();
    super::lot::settle(shared, conn, 0, done, held, Vec::new(), token).await?;
    if aborted {
        // The producer went through an aborted transaction: reopen the lane
        // with a fresh one (fenced, progress read) rather than trust it (on
        // MockCluster its next transaction timed out).
        return Err("the lot's transaction was aborted; the lane is reopened".into());
    }
    Ok(LotTimes {
        handled: handled_at,
        committed,
        settled: Instant::now(),
    })
}

/// After an aborted lot: the row `culprit` (the owner of the refused
/// record, if any) fails as a refused publish would (its retry strategy, or
/// dead-lettered for a [`BusRejection`](crate::transport::BusRejection));
/// the other successful rows are released (nothing of them was published);
/// failed rows keep their outcomes. Returns (what to write, what to release).
fn refused(
    shared: &SubShared,
    done: Vec<Handled>,
    culprit: Option<usize>,
    error: BoxError,
) -> (Vec<Handled>, Vec<Arc<Delivery>>) {
    let mut kept = Vec::with_capacity(done.len());
    let mut released = Vec::new();
    let mut error = Some(error);
    for (i, mut h) in done.into_iter().enumerate() {
        if !matches!(h.outcome, Outcome::Ack) {
            kept.push(h);
        } else if Some(i) == culprit {
            let e = error.take().unwrap_or_else(|| "refused".into());
            h.outcome = if shared.bus_rejected(&h.delivery.row, Some(&*e)) {
                Outcome::Terminal {
                    reason: super::message::FailureReason::Rejected,
                }
            } else {
                shared.follow_on_refused(&h.delivery.row, &*e)
            };
            h.error = Some(e);
            kept.push(h);
        } else {
            released.push(h.delivery);
        }
    }
    (kept, released)
}

/// A lot whose outcome in PostgreSQL will not be written (the lane is
/// lost; its transaction is rolled back with the connection).
fn abandon(shared: &SubShared, done: &[Handled], held: &[Arc<Delivery>]) {
    for h in done {
        shared.metrics.abandoned(&h.delivery.row.queue);
        shared.finished(&h.delivery, Step::Abandoned);
    }
    for d in held {
        shared.finished(d, Step::Released);
    }
}
