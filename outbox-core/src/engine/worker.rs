//! Workers: take claimed rows from the buffer, run the handler, record exactly
//! one outcome per delivery on a long-lived connection.
//!
//! The per-delivery pipeline ([`Worker::process`]: `max_deliveries`, the
//! handler, the ack policy, the retry strategy, the outcome write) is also
//! what synchronous dispatch runs ([`deliver`]), with the delete written at
//! once instead of through the acker.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::SubShared;
use super::backoff::Reconnect;
use crate::broker::Step;
use crate::engine::message::{AckPolicy, Decision, Delivery, FailureReason, Outcome};
use crate::engine::retry::RetryContext;
use crate::engine::subscriber::PoisonPolicy;
use crate::error::BoxError;
use crate::store::OutboxRow;
use crate::store::conn::{self as store, Conn, Write, Written};
use crate::transport::outbox::Staged;

use super::chain::{self, ChainedAck};

/// What a [`Writer`] writes: one guarded statement, or a chained ack's
/// transaction (see [`chain`]).
#[derive(Clone, Copy)]
enum Op<'a> {
    Write(&'a Write),
    Chained(&'a ChainedAck),
}

impl std::fmt::Debug for Op<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write(w) => w.fmt(f),
            Op::Chained(a) => write!(
                f,
                "Delete {{ id: {}, token: {} }} with {} follow-on row(s)",
                a.id,
                a.token,
                a.rows.len()
            ),
        }
    }
}

/// Longest `last_exception` text kept, in characters.
pub const LAST_EXCEPTION_MAX_CHARS: usize = 8192;
const TRUNCATED: &str = "…[truncated]";

/// What a buffered delete records once it landed.
#[derive(Debug, Clone, Copy)]
enum PendingKind {
    Ack,
    Terminal(FailureReason, &'static str),
}

/// A delete waiting for the acker (acks and plain terminals).
pub(crate) struct Pending {
    delivery: Arc<Delivery>,
    kind: PendingKind,
    duration: Option<Duration>,
}

/// How a single guarded write ended.
enum Landed {
    Yes,
    LeaseLost,
    Failed,
}

impl Landed {
    /// What the observer is told: `landed` if the write landed.
    fn step(&self, phase: &'static str, landed: impl FnOnce() -> Step) -> Step {
        match self {
            Landed::Yes => landed(),
            Landed::LeaseLost => Step::LeaseLost { phase },
            Landed::Failed => Step::Abandoned,
        }
    }
}

/// A long-lived connection with the write-and-reconnect logic.
struct Writer {
    shared: Arc<SubShared>,
    conn: Option<Conn>,
    reconnect: Reconnect,
    /// Workers borrow their connection from the subscriber's write pool for
    /// each write (the acker and synchronous dispatch keep their own).
    pooled: bool,
}

/// Most connections a subscriber's workers hold for their own writes
/// (retries, dead-letter moves). Acks go through the acker's connection, so
/// on the happy path workers write nothing; during a bus outage every
/// worker retries its row, and hundreds of workers must not mean hundreds
/// of PostgreSQL connections.
pub(crate) const MAX_WORKER_CONNECTIONS: usize = 4;

/// The connections the workers of one subscriber share for their writes.
#[derive(Debug)]
pub(crate) struct WritePool {
    /// Also taken by the lease heartbeat for its statement.
    pub(super) permits: tokio::sync::Semaphore,
    idle: std::sync::Mutex<Vec<Conn>>,
}

impl WritePool {
    pub(crate) fn new(max_workers: usize) -> Self {
        Self {
            permits: tokio::sync::Semaphore::new(max_workers.clamp(1, MAX_WORKER_CONNECTIONS)),
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub(super) fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Worker {
    shared: Arc<SubShared>,
    writer: Writer,
    /// Where deletes go: the acker, or (`None`, synchronous dispatch)
    /// written at once on this worker's connection.
    acks: Option<AckSender>,
}

/// The queue between the workers and the acker of one subscriber.
pub(crate) type AckSender = mpsc::Sender<Pending>;
/// See [`AckSender`].
pub(crate) type AckReceiver = mpsc::Receiver<Pending>;

/// Capacity of the ack queue: enough for every claimed row, so a worker
/// never waits for the acker unless the database is behind.
pub(crate) fn ack_channel(shared: &SubShared) -> (AckSender, AckReceiver) {
    let o = shared.opts();
    mpsc::channel(
        o.get_fetch_batch_size()
            .max(o.get_terminal_flush_batch_size())
            + o.get_max_workers(),
    )
}

pub(crate) async fn run(shared: Arc<SubShared>, acks: AckSender) {
    let mut w = Worker {
        writer: Writer::pooled(shared.clone()),
        shared,
        acks: Some(acks),
    };
    w.run().await;
}

/// Runs one claimed delivery to its recorded outcome in the caller's task:
/// the same pipeline as a worker, with the delete written at once (no
/// acker). `conn` is the connection to write on (made if `None`, left for
/// the next call).
#[allow(
    dead_code,
    reason = "synchronous dispatch, which only the test harness (feature `testing`) asks for"
)]
pub(crate) async fn deliver(
    shared: Arc<SubShared>,
    delivery: Arc<Delivery>,
    conn: &mut Option<Conn>,
) {
    let mut writer = Writer::new(shared.clone());
    writer.conn = conn.take();
    let mut w = Worker {
        writer,
        shared,
        acks: None,
    };
    w.process(delivery).await;
    *conn = w.writer.conn.take();
}

/// Writes the outcome of a lot's row that outlived `max_hold` and got a
/// lease (guarded by its token, as a leased delivery's).
pub(crate) async fn record_leased(shared: Arc<SubShared>, handled: Handled) {
    let mut w = Worker {
        writer: Writer::pooled(shared.clone()),
        shared,
        acks: None,
    };
    w.record(handled).await;
}

/// Gives back the lease of a lot's row that outlived `max_hold` without
/// starting (the subscriber was stopping).
pub(crate) async fn release_leased(shared: &SubShared, d: &Delivery) {
    let release = async {
        let mut conn = shared.broker.store_conn(&shared.conn_opts).await?;
        store::release(
            shared.broker.stmts(),
            &mut conn,
            vec![d.row.id],
            vec![d.token],
        )
        .await
    };
    let step = match release.await {
        Ok(_) => Step::Released,
        Err(e) => {
            tracing::warn!(
                row_id = d.row.id,
                "could not release an unstarted row ({e}); it is redelivered after its lease expires"
            );
            Step::Abandoned
        }
    };
    shared.finished(d, step);
}

impl Worker {
    async fn run(&mut self) {
        let stop = self.shared.stop_workers.clone();
        loop {
            let delivery = {
                let mut rx = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    rx = self.shared.rx.lock() => rx,
                };
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    d = rx.recv() => match d {
                        Some(d) => d,
                        None => break,
                    },
                }
            };
            if self.shared.tx.capacity() >= self.shared.refill_at {
                self.shared.wake.notify_one();
            }
            self.process(delivery).await;
        }
    }

    /// Hands a delete (ack, or terminal without dead-letter table) to the
    /// acker, which writes it at once or coalesced with others; without an
    /// acker (synchronous dispatch), writes it now.
    async fn defer_delete(&mut self, p: Pending) {
        let Some(acks) = &self.acks else {
            self.writer.flush(vec![p]).await;
            return;
        };
        let q = p.delivery.row.queue.clone();
        let delivery = Arc::clone(&p.delivery);
        if acks.send(p).await.is_err() {
            // The acker is gone (only while the engine is aborted): the row
            // stays leased and is redelivered after the lease expires.
            self.shared.metrics.abandoned(&q);
            self.shared.finished(&delivery, Step::Abandoned);
        }
    }

    async fn process(&mut self, delivery: Arc<Delivery>) {
        let lease_ttl = self.shared.opts().get_lease_ttl();
        if self.shared.leases.expired(&delivery, lease_ttl) {
            // The row waited in the buffer past its lease (the workers were
            // all busy, e.g. waiting on a slow bus, and no heartbeat
            // extended it, or an extension found it taken): another relay
            // may hold it now. Handling it would publish it twice; it is claimed
            // again instead.
            self.writer.lease_lost(&delivery, "buffered");
            self.shared
                .finished(&delivery, Step::LeaseLost { phase: "buffered" });
            return;
        }
        let handled = Handled::run(&self.shared, delivery).await;
        self.record(handled).await;
    }

    /// Acks a delivery whose result staged follow-on rows: the guarded
    /// delete and their inserts in one transaction ([`chain::ack`]); a lost
    /// lease writes neither.
    async fn ack_chained(
        &mut self,
        delivery: &Arc<Delivery>,
        rows: Vec<Staged>,
        duration: Option<Duration>,
    ) {
        let row = &delivery.row;
        let a = ChainedAck {
            id: row.id,
            token: delivery.token,
            rows,
        };
        let since = self.shared.leases.since(delivery);
        let step = match self.writer.write_op(since, Op::Chained(&a)).await {
            Some((Written::Rows(0), _)) => {
                self.writer.lease_lost(delivery, "ack");
                Step::LeaseLost { phase: "ack" }
            }
            Some((_, Ok(inserted))) => {
                chain::landed(&inserted);
                self.shared.metrics.acked(&row.queue, duration);
                Step::Acked
            }
            Some((_, Err(error))) => {
                // The database refused the follow-on rows (rolled back with
                // the delete): the delivery failed, as a refused publish.
                let outcome = self.shared.follow_on_refused(row, &*error);
                let failed = Handled {
                    delivery: delivery.clone(),
                    outcome,
                    error: Some(error),
                    duration,
                };
                Box::pin(self.record(failed)).await;
                return;
            }
            None => {
                self.shared.metrics.abandoned(&row.queue);
                Step::Abandoned
            }
        };
        self.shared.finished(delivery, step);
    }

    /// Writes the outcome of a leased delivery (guarded by its token).
    pub(super) async fn record(&mut self, handled: Handled) {
        let Handled {
            delivery,
            outcome,
            error,
            duration,
        } = handled;
        let row = &delivery.row;
        let kind = crate::instrument::error_kind(error.as_ref());
        match outcome {
            Outcome::Ack => {
                let chained = delivery.take_chained();
                if !chained.is_empty() {
                    // Follow-on rows: written with the delete, in one
                    // transaction of this worker (not the acker's batch).
                    self.ack_chained(&delivery, chained, duration).await;
                    return;
                }
                let p = Pending {
                    delivery: delivery.clone(),
                    kind: PendingKind::Ack,
                    duration,
                };
                self.defer_delete(p).await;
            }
            Outcome::Retry { delay } => {
                let w = Write::Retry {
                    id: row.id,
                    token: delivery.token,
                    delay,
                };
                let landed = self.writer.write_single(&delivery, &w, "retry").await;
                self.shared
                    .finished(&delivery, landed.step("retry", || Step::Retried { delay }));
                if let Landed::Yes = landed {
                    self.shared
                        .retried(row, delay, kind, duration, error.as_deref());
                }
            }
            Outcome::Terminal { reason } => {
                let text = error.as_deref().and_then(|e| self.shared.render(e));
                if self.shared.broker.dlq().is_some() {
                    let w = Write::DeadLetter {
                        id: row.id,
                        token: delivery.token,
                        reason: reason.as_str(),
                        last_exception: text.clone(),
                    };
                    let landed = self.writer.write_single(&delivery, &w, "terminal").await;
                    self.shared.finished(
                        &delivery,
                        landed.step("terminal", || Step::DeadLettered {
                            reason,
                            last_exception: text.clone(),
                        }),
                    );
                    if let Landed::Yes = landed {
                        self.shared
                            .dead_lettered(row, reason, kind, duration, text.as_deref());
                    }
                } else {
                    self.shared.deleting_terminal(row, reason, text.as_deref());
                    let p = Pending {
                        delivery: delivery.clone(),
                        kind: PendingKind::Terminal(reason, kind),
                        duration,
                    };
                    self.defer_delete(p).await;
                }
            }
        }
    }
}

/// What one delivery came to, before anything is written: its outcome, the
/// handler's error, and how long the handler ran (`None`: it did not run).
pub(crate) struct Handled {
    pub(crate) delivery: Arc<Delivery>,
    pub(crate) outcome: Outcome,
    pub(crate) error: Option<BoxError>,
    pub(crate) duration: Option<Duration>,
}

impl Handled {
    /// Runs the handler for `delivery` (unless `max_deliveries` is
    /// exceeded) and decides the outcome; writes nothing.
    pub(crate) async fn run(shared: &SubShared, delivery: Arc<Delivery>) -> Self {
        let (outcome, error, duration) = shared.dispatch(&delivery).await;
        Self {
            delivery,
            outcome,
            error,
            duration,
        }
    }
}

/// What the handlers' outcomes mean once their writes landed: logs and
/// metrics, the same for leased deliveries and lots.
impl SubShared {
    /// A retry landed: wake-up at its due time, metrics, the WARN.
    pub(super) fn retried(
        &self,
        row: &OutboxRow,
        delay: Duration,
        kind: &'static str,
        duration: Option<Duration>,
        error: Option<&(dyn std::error::Error + Send + Sync + 'static)>,
    ) {
        // Wake the fetch loop when the retry is due, not at its next poll.
        self.due_in(delay);
        self.metrics.retried(&row.queue, kind, duration);
        tracing::warn!(
            queue = %row.queue, row_id = row.id, correlation_id = %row.correlation_id(),
            attempt = row.attempts_count + 1,
            "outbox handler failed; retrying in {delay:.3?}: {}",
            error.map(render_default).unwrap_or_else(|| "nacked".into())
        );
    }

    /// A dead-letter move landed: metrics, the ERROR.
    pub(super) fn dead_lettered(
        &self,
        row: &OutboxRow,
        reason: FailureReason,
        kind: &'static str,
        duration: Option<Duration>,
        text: Option<&str>,
    ) {
        self.metrics
            .terminal(&row.queue, reason.as_str(), kind, duration, true);
        tracing::error!(
            queue = %row.queue, row_id = row.id, correlation_id = %row.correlation_id(),
            reason = reason.as_str(),
            "outbox row failed for good; moved to the dead-letter table: {}",
            text.unwrap_or("-")
        );
    }

    /// The outcome of a delivery whose follow-on rows the database refused
    /// (queue chaining; see [`chain`]): what the handler's error would give
    /// for a refused publish (terminal under
    /// [`AckPolicy::RejectOnError`], else the retry strategy's).
    pub(super) fn follow_on_refused(
        &self,
        row: &OutboxRow,
        error: &(dyn std::error::Error + Send + Sync + 'static),
    ) -> Outcome {
        if self.opts().get_ack_policy() == AckPolicy::RejectOnError {
            return Outcome::Terminal {
                reason: FailureReason::Rejected,
            };
        }
        self.retry_outcome(row, Some(error))
    }

    /// A terminal row is about to be deleted (no dead-letter table).
    pub(super) fn deleting_terminal(
        &self,
        row: &OutboxRow,
        reason: FailureReason,
        text: Option<&str>,
    ) {
        tracing::error!(
            queue = %row.queue, row_id = row.id, correlation_id = %row.correlation_id(),
            reason = reason.as_str(),
            "outbox row failed for good; deleting it (no dead-letter table configured): {}",
            text.unwrap_or("-")
        );
    }

    /// Runs the handler (unless `max_deliveries` is exceeded) inside the
    /// per-delivery layers of [`deliver`](super::deliver), and decides the
    /// outcome. Never panics: a panicking handler or strategy is an error.
    pub(super) async fn dispatch(
        &self,
        delivery: &Arc<Delivery>,
    ) -> (Outcome, Option<BoxError>, Option<Duration>) {
        let row = &delivery.row;
        let opts = self.opts();
        if let Some(max) = opts.get_max_deliveries()
            && u64::try_from(row.deliveries_count).unwrap_or(0) > max
        {
            {
                tracing::error!(
                    queue = %row.queue, row_id = row.id, correlation_id = %row.correlation_id(),
                    deliveries_count = row.deliveries_count,
                    "outbox row {} exceeded max_deliveries={max}; not running the handler", row.id
                );
                return (
                    Outcome::Terminal {
                        reason: FailureReason::MaxDeliveries,
                    },
                    None,
                    None,
                );
            }
        }
        let ran = super::deliver::run(self, delivery).await;
        let (outcome, error) = self.resolve(delivery, ran.result);
        (outcome, error, Some(ran.elapsed))
    }

    fn resolve(
        &self,
        delivery: &Delivery,
        result: Result<(), BoxError>,
    ) -> (Outcome, Option<BoxError>) {
        let row = &delivery.row;
        let policy = self.opts().get_ack_policy();
        let decision = match (delivery.decision(), &result, policy) {
            (Some(d), _, _) => d,
            (None, Ok(()), AckPolicy::Manual) => {
                tracing::error!(
                    queue = %row.queue, row_id = row.id,
                    "handler returned without ack/nack/reject under AckPolicy::Manual; rejecting the row as fallback"
                );
                Decision::Reject
            }
            (None, Ok(()), _) => Decision::Ack,
            (None, Err(_), AckPolicy::RejectOnError) => Decision::Reject,
            (None, Err(e), AckPolicy::Manual) => {
                tracing::error!(
                    queue = %row.queue, row_id = row.id,
                    "handler failed without recording ack/nack/reject; nacking: {e}"
                );
                Decision::Nack
            }
            (None, Err(_), _) => Decision::Nack,
        };
        let error = result.err();
        let outcome = match decision {
            Decision::Ack => Outcome::Ack,
            Decision::Reject => Outcome::Terminal {
                reason: FailureReason::Rejected,
            },
            Decision::Nack if self.bus_rejected(row, error.as_deref()) => Outcome::Terminal {
                reason: FailureReason::Rejected,
            },
            Decision::Nack => self.retry_outcome(row, error.as_deref()),
        };
        (outcome, error)
    }

    /// A bus refused the row for good and the subscriber keeps the default
    /// retry strategy: retrying cannot help, so the row goes terminal now
    /// (reason `rejected`; a custom strategy decides for itself).
    pub(super) fn bus_rejected(
        &self,
        row: &OutboxRow,
        error: Option<&(dyn std::error::Error + Send + Sync + 'static)>,
    ) -> bool {
        if self.opts().has_custom_retry() {
            return false;
        }
        let Some(e) = error else { return false };
        let e: &(dyn std::error::Error + 'static) = e;
        let Some(rejection) = crate::transport::BusRejection::find(e) else {
            return false;
        };
        tracing::warn!(
            queue = %row.queue, row_id = row.id, correlation_id = %row.correlation_id(),
            bus = rejection.bus(),
            "{} refused outbox row {} for good; not retrying it (reason rejected)",
            rejection.bus(),
            row.id
        );
        true
    }

    fn retry_outcome(
        &self,
        row: &OutboxRow,
        error: Option<&(dyn std::error::Error + Send + Sync + 'static)>,
    ) -> Outcome {
        let opts = self.opts();
        if opts.get_ordered()
            && row.ordering_key.is_some()
            && opts.get_poison_policy() == PoisonPolicy::DeadLetterAndContinue
        {
            // Retrying would hold the key back; the policy says move on.
            tracing::warn!(
                queue = %row.queue, row_id = row.id, key = row.ordering_key.as_deref().unwrap_or(""),
                "ordered subscriber: the head of its key failed; poison policy \
                 DeadLetterAndContinue moves it to the dead-letter table and the key goes on"
            );
            return Outcome::Terminal {
                reason: FailureReason::RetryTerminal,
            };
        }
        let now = self.now();
        let ctx = RetryContext::new(
            u64::try_from(row.attempts_count).unwrap_or(0) + 1,
            row.first_attempt_at.unwrap_or(now),
            now,
            error,
        );
        let strategy = self.sub.retry();
        let terminal = Outcome::Terminal {
            reason: FailureReason::RetryTerminal,
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| strategy.next_delay(&ctx))) {
            Ok(Ok(Some(delay))) => Outcome::Retry { delay },
            Ok(Ok(None)) => terminal,
            Ok(Err(e)) => {
                tracing::error!(
                    row_id = row.id,
                    "retry strategy {strategy:?} failed: {e}; giving up (retry_terminal)"
                );
                terminal
            }
            Err(p) => {
                tracing::error!(
                    row_id = row.id,
                    "retry strategy {strategy:?} panicked: {}; giving up (retry_terminal)",
                    super::deliver::panic_message(p)
                );
                terminal
            }
        }
    }

    pub(super) fn render(
        &self,
        e: &(dyn std::error::Error + Send + Sync + 'static),
    ) -> Option<String> {
        let text = match self.broker.renderer() {
            Some(r) => r(e)?,
            None => render_default(e),
        };
        Some(cap_text(text))
    }
}

impl Writer {
    fn new(shared: Arc<SubShared>) -> Self {
        Self {
            shared,
            conn: None,
            reconnect: Reconnect::default(),
            pooled: false,
        }
    }

    /// A worker's writer: borrows a connection of the write pool per write.
    fn pooled(shared: Arc<SubShared>) -> Self {
        Self {
            pooled: true,
            ..Self::new(shared)
        }
    }

    /// Writes one guarded statement; how it ended (lease lost, or the
    /// write could not be made (the row then stays leased and is redelivered
    /// after the lease expires).
    async fn write_single(
        &mut self,
        delivery: &Delivery,
        w: &Write,
        phase: &'static str,
    ) -> Landed {
        let since = self.shared.leases.since(delivery);
        match self.write(since, w).await {
            Some(Written::Rows(0)) => {
                self.lease_lost(delivery, phase);
                Landed::LeaseLost
            }
            Some(_) => Landed::Yes,
            None => {
                self.shared.metrics.abandoned(&delivery.row.queue);
                Landed::Failed
            }
        }
    }

    fn lease_lost(&self, delivery: &Delivery, phase: &'static str) {
        self.shared.metrics.lease_lost(&delivery.row.queue, phase);
        let row = &delivery.row;
        tracing::warn!(
            event = "lease_lost",
            phase,
            row_id = row.id,
            queue = %row.queue,
            deliveries_count = row.deliveries_count,
            "{}",
            if phase == "buffered" {
                format!("outbox row {} waited in the buffer past its lease; not handling it (it will be claimed again)", row.id)
            } else {
                format!("outbox row {} lease expired before {phase} write; skipping", row.id)
            }
        );
    }

    /// Executes a write, reconnecting and retrying while the lease can still
    /// be valid. Statement errors that are not connection problems are logged
    /// and give up: the row stays leased, nothing is deleted.
    async fn write(&mut self, claimed_at: Instant, w: &Write) -> Option<Written> {
        self.write_op(claimed_at, Op::Write(w))
            .await
            .map(|(done, _)| done)
    }

    /// [`write`](Self::write) of a plain write or of a chained ack (which
    /// also says which follow-on rows it inserted).
    async fn write_op(
        &mut self,
        claimed_at: Instant,
        w: Op<'_>,
    ) -> Option<(Written, chain::Chained)> {
        if !self.pooled {
            return self.write_on_own(claimed_at, w).await;
        }
        let shared = self.shared.clone();
        let Ok(_permit) = shared.write_pool.permits.acquire().await else {
            return None; // never closed
        };
        self.conn = shared.write_pool.idle().pop();
        let written = self.write_on_own(claimed_at, w).await;
        if let Some(conn) = self.conn.take() {
            shared.write_pool.idle().push(conn);
        }
        written
    }

    async fn write_on_own(
        &mut self,
        claimed_at: Instant,
        w: Op<'_>,
    ) -> Option<(Written, chain::Chained)> {
        let lease = self.shared.opts().get_lease_ttl();
        loop {
            if self.conn.is_none() {
                match self.shared.broker.store_conn(&self.shared.conn_opts).await {
                    Ok(c) => {
                        self.conn = Some(c);
                    }
                    Err(e) => {
                        let wait = self.reconnect.failed();
                        if claimed_at.elapsed() + wait >= lease {
                            tracing::error!(
                                "outbox worker cannot connect ({e}); giving up on {w:?}: the lease expires first, the row will be redelivered"
                            );
                            return None;
                        }
                        tracing::warn!("outbox worker cannot connect: {e}; retrying in {wait:.1?}");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            let conn = self.conn.as_mut()?;
            let stmts = self.shared.broker.stmts();
            let written = match w {
                Op::Write(w) => store::execute(stmts, conn, w)
                    .await
                    .map(|d| (d, Ok(Vec::new()))),
                Op::Chained(a) => chain::ack(stmts, conn, a).await,
            };
            match written {
                Ok(done) => {
                    self.reconnect.worked();
                    return Some(done);
                }
                Err(e) if store::is_connection_error(&e) => {
                    self.conn = None;
                    let wait = self.reconnect.failed();
                    if claimed_at.elapsed() + wait >= lease {
                        tracing::error!(
                            "outbox worker lost its connection ({e}); giving up on {w:?}: the lease expires first, the row will be redelivered"
                        );
                        return None;
                    }
                    tracing::warn!(
                        "outbox worker lost its connection: {e}; retrying in {wait:.1?}"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::error!(
                        "outbox write {w:?} failed: {e}; the row stays leased and will be redelivered after the lease expires"
                    );
                    return None;
                }
            }
        }
    }
}

/// Writes the deletes of one subscriber (acks, and terminal failures when no
/// dead-letter table is configured) on its own connection. With
/// `terminal_flush_batch_size` 1 every delete is written as soon as the
/// previous statement returned, and deletes that arrived meanwhile go
/// together in the next one (never delayed, like a group commit). With a
/// larger size, deletes are held until that many are ready, none arrives
/// for [`ACK_LINGER`], or the oldest one's claim is half a lease old.
pub(crate) async fn run_acker(shared: Arc<SubShared>, mut rx: AckReceiver) {
    let mut writer = Writer::new(shared.clone());
    let target = shared.opts().get_terminal_flush_batch_size();
    let half_lease = shared.opts().get_lease_ttl() / 2;
    let mut batch: Vec<Pending> = Vec::new();
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(p) => batch.push(p),
                None => return,
            }
        }
        while batch.len() < MAX_ACK_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let mut closed = false;
        while batch.len() < target {
            let oldest = batch
                .iter()
                .map(|p| p.delivery.claimed_at)
                .min()
                .unwrap_or_else(Instant::now);
            let until_half_lease = half_lease.saturating_sub(oldest.elapsed());
            if until_half_lease.is_zero() {
                break;
            }
            match tokio::time::timeout(ACK_LINGER.min(until_half_lease), rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_lingered) => break,
            }
        }
        writer.flush(std::mem::take(&mut batch)).await;
        if closed {
            return;
        }
    }
}

/// The most deletes in one statement.
const MAX_ACK_BATCH: usize = 5000;

/// How long a batching acker (`terminal_flush_batch_size > 1`) waits for
/// more deletes before writing what it has.
pub(crate) const ACK_LINGER: Duration = Duration::from_millis(5);

impl Writer {
    /// One `DELETE ... USING unnest(ids, tokens)` for all buffered deletes.
    async fn flush(&mut self, batch: Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        let oldest = batch
            .iter()
            .map(|p| self.shared.leases.since(&p.delivery))
            .min()
            .unwrap_or_else(Instant::now);
        let done: Option<std::collections::HashSet<i64>> = if let [p] = &batch[..] {
            // One delete: the simpler statement.
            let w = Write::Delete {
                id: p.delivery.row.id,
                token: p.delivery.token,
            };
            match self.write(oldest, &w).await {
                Some(Written::Rows(n)) => {
                    Some((n > 0).then_some(p.delivery.row.id).into_iter().collect())
                }
                _ => None,
            }
        } else {
            let w = Write::DeleteBatch {
                ids: batch.iter().map(|p| p.delivery.row.id).collect(),
                tokens: batch.iter().map(|p| p.delivery.token).collect(),
            };
            match self.write(oldest, &w).await {
                Some(Written::Ids(ids)) => Some(ids.into_iter().collect()),
                _ => None,
            }
        };
        if let Some(done) = done {
            for p in &batch {
                let q = &p.delivery.row.queue;
                if !done.contains(&p.delivery.row.id) {
                    self.lease_lost(&p.delivery, "terminal");
                    self.shared
                        .finished(&p.delivery, Step::LeaseLost { phase: "terminal" });
                    continue;
                }
                let m = &self.shared.metrics;
                match p.kind {
                    PendingKind::Ack => m.acked(q, p.duration),
                    PendingKind::Terminal(reason, kind) => {
                        m.terminal(q, reason.as_str(), kind, p.duration, false)
                    }
                }
                let step = match p.kind {
                    PendingKind::Ack => Step::Acked,
                    PendingKind::Terminal(reason, _) => Step::Deleted { reason },
                };
                self.shared.finished(&p.delivery, step);
            }
            tracing::debug!(count = batch.len(), "flushed batched deletes");
        } else {
            for p in &batch {
                self.shared.metrics.abandoned(&p.delivery.row.queue);
                self.shared.finished(&p.delivery, Step::Abandoned);
            }
        }
    }
}

/// The error and its sources, `": "`-separated (see
/// [`render_error_chain`](crate::error::render_error_chain)).
pub(crate) fn render_default(e: &(dyn std::error::Error + Send + Sync + 'static)) -> String {
    crate::error::render_error_chain(e)
}

/// Caps `last_exception` at [`LAST_EXCEPTION_MAX_CHARS`] characters.
pub(crate) fn cap_text(text: String) -> String {
    if text.chars().count() <= LAST_EXCEPTION_MAX_CHARS {
        return text;
    }
    let keep = LAST_EXCEPTION_MAX_CHARS - TRUNCATED.chars().count();
    let mut out: String = text.chars().take(keep).collect();
    out.push_str(TRUNCATED);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_capped_on_a_char_boundary() {
        let text = "é".repeat(10_000);
        let capped = cap_text(text);
        assert_eq!(capped.chars().count(), LAST_EXCEPTION_MAX_CHARS);
        assert!(capped.ends_with(TRUNCATED));
        assert_eq!(cap_text("short".into()), "short");
    }

    #[test]
    fn default_rendering_walks_sources() {
        let inner = std::io::Error::other("disk on fire");
        #[derive(Debug, thiserror::Error)]
        #[error("write failed")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(inner);
        assert_eq!(render_default(&e), "write failed: disk on fire");
    }
}
