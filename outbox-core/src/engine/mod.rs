//! The subscriber engine: claims rows with leases and runs handlers.
//!
//! Per subscriber: one fetch loop on its own connection that claims rows
//! (`FOR UPDATE SKIP LOCKED`, a fresh lease token per claim) into a bounded
//! buffer of `fetch_batch_size` rows; `max_workers` workers that run the
//! handler and record retries and dead-letter moves on connections they
//! share (at most [`worker::MAX_WORKER_CONNECTIONS`] per subscriber); one
//! acker that writes the deletes (acks) on its own connection. Per engine:
//! one LISTEN connection that wakes the fetch loops of the served queues.
//! Every write after a claim is guarded by the lease token. An idle fetch
//! loop sleeps until a wake-up, its next poll, or the earliest row it knows
//! to become due, whichever comes first.
//!
//! Storage goes through [`store`] on the broker's backend value (a
//! PostgreSQL connection, or an in-process store such as the test harness's).
//! The engine reports what it does to the broker's [`Observer`] (a no-op
//! unless a test harness watches), registers itself there as an
//! [`EngineHandle`], and can deliver rows synchronously
//! ([`EngineHandle::dispatch_round`]) when the observer asks for it.

mod backoff;
pub(crate) mod budget;
mod chain;
mod deliver;
mod fetch;
pub(crate) mod gauges;
pub(crate) mod handler;
pub(crate) mod health;
mod heartbeat;
pub(crate) mod lane;
mod listen;
mod lot;
pub(crate) mod message;
// What only an observer that drives the engine (the test harness) uses:
// without one, nothing calls it.
#[allow(
    dead_code,
    reason = "used by an observer that drives the engine (the test harness, feature `testing`)"
)]
mod observe;
pub mod retry;
pub(crate) mod subscriber;
pub(crate) mod summary;
mod worker;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::{EngineHandle, Observer, OutboxBroker, Step};
use crate::engine::message::Delivery;
use crate::engine::subscriber::{ClaimMode, Subscriber, SubscriberOptions};
use crate::error::{Error, Result};
use crate::store::conn as store;

pub use worker::LAST_EXCEPTION_MAX_CHARS;

/// Where the engine listens for NOTIFY wake-ups.
#[derive(Debug, Clone, Default)]
enum ListenMode {
    /// On a dedicated connection made with the pool's connect options.
    #[default]
    Pool,
    /// On a dedicated connection made with these options (e.g. a direct
    /// connection when the pool goes through a transaction-pooling PgBouncer,
    /// where LISTEN does not work).
    Custom(Box<PgConnectOptions>),
    /// Not at all: poll only.
    Off,
}

/// Runs subscribers against an [`OutboxBroker`].
///
/// Cheap to clone; clones control the same engine (for example, one clone
/// stops it while another runs a health endpoint with [`ping`](Self::ping)).
///
/// ```no_run
/// use std::time::Duration;
/// use outbox_core::{BoxError, Engine, Message, OutboxBroker, OutboxTable, Subscriber};
///
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
/// let broker = OutboxBroker::new(pool, OutboxTable::new("outbox")?);
/// broker.migrate().await?;
/// let orders = Subscriber::builder(["orders"]).max_workers(4).build(
///     |msg: Message| async move {
///         let order_id: i64 = msg.decode()?;
///         println!("got order {order_id}");
///         Ok::<_, BoxError>(())
///     },
/// )?;
/// let engine = Engine::new(broker).subscriber(orders);
/// engine.start().await?;
/// tokio::signal::ctrl_c().await.ok();
/// let report = engine.stop().await; // graceful: finishes in-flight rows, releases the rest
/// println!("{report:?}");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Engine {
    broker: OutboxBroker,
    subscribers: Vec<Arc<Subscriber>>,
    listen: ListenMode,
    application_name: String,
    gauge_interval: Option<Duration>,
    state: Arc<Mutex<Option<Running>>>,
}

#[derive(Debug)]
struct Running {
    subs: Vec<SubRuntime>,
    listener: Option<(CancellationToken, JoinHandle<()>)>,
    /// What the LISTEN loop reports ([`Engine::health`]).
    listen_status: Option<Arc<health::ListenStatus>>,
    sampler: Option<(CancellationToken, JoinHandle<()>)>,
    /// This engine as its broker's observer sees it, and its registration
    /// there.
    attached: (Arc<observe::Attached>, u64),
}

impl Running {
    /// Leaves the observer (no more synchronous dispatch or wake-ups).
    fn detach(&self) {
        let (engine, id) = &self.attached;
        engine.observer().engine_stopped(*id);
    }
}

#[derive(Debug)]
struct SubRuntime {
    shared: Arc<SubShared>,
    fetch: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    /// `None` under synchronous dispatch (no loops run).
    acker: Option<JoinHandle<()>>,
    /// The lease heartbeat (`None`: off, or synchronous dispatch); stopped
    /// after the drain.
    heartbeat: Option<(CancellationToken, JoinHandle<()>)>,
}

/// State shared by one subscriber's fetch loop and workers.
#[derive(Debug)]
pub(crate) struct SubShared {
    pub(crate) sub: Arc<Subscriber>,
    pub(crate) broker: OutboxBroker,
    /// Connect options of the fetch loop's connection.
    pub(crate) fetch_opts: PgConnectOptions,
    /// Connect options of the workers' connections.
    pub(crate) conn_opts: PgConnectOptions,
    pub(crate) wake: Notify,
    /// The earliest time a row of these queues is known to become due
    /// (a retry this subscriber scheduled, or a future-dated row it saw).
    due: std::sync::Mutex<Option<Instant>>,
    /// Signalled when `due` moved earlier.
    due_changed: Notify,
    pub(crate) stop_fetch: CancellationToken,
    pub(crate) stop_workers: CancellationToken,
    pub(crate) tx: mpsc::Sender<Arc<Delivery>>,
    pub(crate) rx: Mutex<mpsc::Receiver<Arc<Delivery>>>,
    /// Fetch once at least this many buffer slots are free.
    pub(crate) refill_at: usize,
    /// The connections the workers share for their own writes.
    pub(crate) write_pool: worker::WritePool,
    pub(crate) metrics: crate::instrument::SubMetrics,
    /// The periodic activity summary (INFO), counted from finished rows.
    summary: summary::Summary,
    /// The broker's observer (a no-op unless a test harness watches).
    observer: Arc<dyn Observer>,
    /// Claims running now.
    claiming: AtomicUsize,
    /// Claimed rows whose outcome is not recorded yet.
    inflight: AtomicUsize,
    /// An ordered subscriber's key cursor: the walk over the keys of the
    /// next claim starts after it. `None` for an unordered subscriber.
    key_cursor: Option<std::sync::Mutex<String>>,
    /// [`ClaimMode::Transaction`]: rows of lots that were never started
    /// (the subscriber was stopping), released by their lot's commit.
    pub(crate) released: AtomicUsize,
    /// [`ClaimMode::Transaction`]: the tasks finishing the rows that
    /// outlived `max_hold` under their lease (a stop waits for them).
    pub(crate) overdue: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The leases the heartbeat extends: every row this subscriber holds a
    /// lease on, until its delivery is [finished](Self::finished).
    pub(crate) leases: heartbeat::Leases,
}

impl SubShared {
    fn new(
        sub: Arc<Subscriber>,
        broker: OutboxBroker,
        fetch_opts: PgConnectOptions,
        conn_opts: PgConnectOptions,
    ) -> Self {
        let cap = sub.options().get_fetch_batch_size();
        let workers = sub.options().get_max_workers();
        let (tx, rx) = mpsc::channel(cap);
        // Synchronous dispatch runs no loop, so no heartbeat either.
        let heartbeat =
            !broker.observer().synchronous() && sub.options().get_lease_heartbeat().is_some();
        Self {
            metrics: crate::instrument::SubMetrics::new(sub.name(), sub.queues()),
            summary: summary::Summary::new(sub.name(), sub.queues()),
            observer: broker.observer().clone(),
            claiming: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            key_cursor: sub
                .options()
                .get_ordered()
                .then(|| std::sync::Mutex::new(String::new())),
            sub,
            broker,
            fetch_opts,
            conn_opts,
            wake: Notify::new(),
            due: std::sync::Mutex::new(None),
            due_changed: Notify::new(),
            stop_fetch: CancellationToken::new(),
            stop_workers: CancellationToken::new(),
            tx,
            rx: Mutex::new(rx),
            refill_at: (cap / 2).max(1),
            write_pool: worker::WritePool::new(workers),
            released: AtomicUsize::new(0),
            overdue: std::sync::Mutex::new(Vec::new()),
            leases: heartbeat::Leases::new(heartbeat),
        }
    }

    /// A claim of up to `limit` rows of this subscriber's queues (a nil
    /// token, unordered: the caller sets them).
    pub(crate) fn claim_args(&self, limit: usize, with_expired: bool) -> store::ClaimArgs<'_> {
        store::ClaimArgs {
            queues: self.sub.queues(),
            limit,
            lease_ttl: self.opts().get_lease_ttl(),
            token: uuid::Uuid::nil(),
            with_expired,
            ordered: None,
        }
    }

    /// The tasks finishing rows that outlived `max_hold` (what a stop waits
    /// for, or an abort aborts).
    fn take_overdue(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(
            &mut *self
                .overdue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Whether this subscriber claims in lots ([`ClaimMode::Transaction`]).
    pub(crate) fn in_lots(&self) -> bool {
        self.opts().get_claim_mode() == ClaimMode::Transaction
    }

    pub(crate) fn opts(&self) -> &SubscriberOptions {
        self.sub.options()
    }

    /// The storage clock as the worker sees it: the wall clock, or the
    /// in-process store's clock.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.broker.backend().now()
    }

    /// Waits for a wake-up, `timeout`, or stop; `true` if stopping.
    pub(crate) async fn wait(&self, timeout: Duration) -> bool {
        tokio::select! {
            _ = self.stop_fetch.cancelled() => true,
            _ = self.wake.notified() => false,
            _ = tokio::time::sleep(timeout) => false,
        }
    }

    /// Records that a row of these queues becomes due `after` from now, so
    /// an idle fetch loop claims it then instead of at its next poll.
    pub(crate) fn due_in(&self, after: Duration) {
        // An in-process store runs on its own clock, whose owner (the test
        // harness) wakes the subscribers itself when it moves.
        if self.broker.backend().is_local() {
            return;
        }
        let Some(at) = Instant::now().checked_add(after) else {
            return;
        };
        let mut due = self
            .due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if due.is_none_or(|d| at < d) {
            *due = Some(at);
            drop(due);
            self.due_changed.notify_one();
        }
    }

    /// The idle wait: until a wake-up, the earliest known due time,
    /// `timeout`, or stop; `true` if stopping.
    pub(crate) async fn wait_idle(&self, timeout: Duration) -> bool {
        let until = Instant::now().checked_add(timeout);
        loop {
            let due = *self
                .due
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let deadline = match (due, until) {
                (Some(d), Some(u)) => Some(d.min(u)),
                (d, u) => d.or(u),
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.stop_fetch.cancelled() => return true,
                _ = self.wake.notified() => return false,
                _ = self.due_changed.notified() => continue,
                _ = sleep => {
                    let mut due = self.due.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if due.is_some_and(|d| d <= Instant::now()) {
                        *due = None;
                    }
                    return false;
                }
            }
        }
    }

    /// Sleeps `d` unless stopping first; `true` if stopping.
    pub(crate) async fn sleep_or_stop(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop_fetch.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}

/// What the engine reports to the broker's [`Observer`], and the counts
/// behind [`EngineHandle::busy`].
impl SubShared {
    /// A claim is about to run.
    pub(crate) fn claim_begins(&self) {
        self.claiming.fetch_add(1, SeqCst);
    }

    /// Where an ordered claim starts its walk over the keys (`None`: the
    /// subscriber is unordered).
    pub(crate) fn key_cursor(&self) -> Option<String> {
        self.key_cursor.as_ref().map(|c| {
            c.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }

    /// The claim that [`claim_begins`](Self::claim_begins) announced
    /// returned `rows` (now in flight until their outcome is recorded).
    pub(crate) fn claim_ends(&self, rows: &[crate::store::OutboxRow]) {
        if let Some(cursor) = &self.key_cursor {
            let mut cursor = cursor
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(next) = next_cursor(&cursor, rows) {
                *cursor = next;
            }
        }
        self.inflight.fetch_add(rows.len(), SeqCst);
        self.claiming.fetch_sub(1, SeqCst);
        for r in rows {
            let step = Step::Claimed {
                deliveries_count: r.deliveries_count,
            };
            self.observer.step(r.id, step);
        }
        self.observer.changed();
    }

    /// The handler is about to run for `row`.
    pub(crate) fn handler_called(&self, row: &crate::store::OutboxRow) {
        self.observer.handler_called(self.sub.name(), row);
    }

    /// Delivery `d` ended with `step` (its write landed, lost its lease, or
    /// could not be made).
    pub(crate) fn finished(&self, d: &Delivery, step: Step) {
        let row_id = d.row.id;
        self.leases.untrack(d);
        self.inflight.fetch_sub(1, SeqCst);
        if self.key_cursor.is_some() {
            // The key's next row may be its head now: claim again (an
            // ordered claim can come back empty while every key with rows
            // has one in flight, and must not wait for the idle poll).
            self.wake.notify_one();
        }
        self.summary.finished(&step);
        self.observer.step(row_id, step);
        self.observer.changed();
    }
}

/// The cursor after an ordered claim that started after `cursor` and
/// returned `rows`: the last key the walk took, in its order (the keys after
/// the cursor, then those from the first key up to it). Keys compare as
/// bytes, as the claim's `COLLATE "C"` walk does. `None`: no keyed row.
fn next_cursor(cursor: &str, rows: &[crate::store::OutboxRow]) -> Option<String> {
    let keys = rows.iter().filter_map(|r| r.ordering_key.as_deref());
    let (wrapped, after): (Vec<&str>, Vec<&str>) = keys.partition(|k| *k <= cursor);
    wrapped
        .into_iter()
        .max()
        .or_else(|| after.into_iter().max())
        .map(str::to_owned)
}

/// What the acker gets to write its last deletes at stop, even when the
/// graceful timeout is used up.
const ACKER_FINAL_FLUSH: Duration = Duration::from_secs(2);

/// Default [`Engine::gauge_interval`].
pub const DEFAULT_GAUGE_INTERVAL: Duration = Duration::from_secs(15);

/// What a graceful [`Engine::stop`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StopReport {
    /// Rows claimed but never started, whose leases were released so another
    /// replica can take them at once.
    pub released: usize,
    /// Subscribers whose in-flight handlers did not finish within the
    /// graceful timeout (their rows are redelivered after the lease expires).
    pub timed_out: Vec<String>,
}

impl Engine {
    /// An engine for `broker`, with no subscribers yet.
    pub fn new(broker: OutboxBroker) -> Self {
        Self {
            broker,
            subscribers: Vec::new(),
            listen: ListenMode::Pool,
            application_name: "outbox".to_owned(),
            gauge_interval: Some(DEFAULT_GAUGE_INTERVAL),
            state: Arc::new(Mutex::new(None)),
        }
    }

    /// Adds a subscriber. Serving a queue that another subscriber of this
    /// engine already serves is allowed (they compete for rows) but logged.
    pub fn subscriber(mut self, sub: Subscriber) -> Self {
        for other in &self.subscribers {
            let shared: Vec<&String> = sub
                .queues()
                .iter()
                .filter(|q| other.queues().contains(q))
                .collect();
            if !shared.is_empty() {
                tracing::warn!(
                    "subscribers `{}` and `{}` both serve {shared:?}: their workers will compete for the rows",
                    other.name(),
                    sub.name()
                );
            }
        }
        self.subscribers.push(Arc::new(sub));
        self
    }

    /// Disables LISTEN/NOTIFY wake-ups: subscribers poll between
    /// `min_fetch_interval` and `max_fetch_interval`.
    pub fn without_listen(mut self) -> Self {
        self.listen = ListenMode::Off;
        self
    }

    /// Listens on a connection made with `opts` instead of the pool's options
    /// (needed when the pool goes through a transaction-pooling proxy).
    pub fn listen_with(mut self, opts: PgConnectOptions) -> Self {
        self.listen = ListenMode::Custom(Box::new(opts));
        self
    }

    /// The `application_name` prefix of the engine's own connections
    /// (default `outbox`; they are named `<prefix>-fetch`, `-worker`, `-listen`).
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// How often the per-queue gauges (`outbox_ready_rows`,
    /// `outbox_oldest_ready_age_seconds`, …; see [`crate::telemetry`]) are
    /// sampled with one [`OutboxBroker::stats_for`] call; `None` turns the
    /// sampling off. Default 15 s.
    pub fn gauge_interval(mut self, every: Option<Duration>) -> Self {
        self.gauge_interval = every;
        self
    }

    /// The broker.
    pub fn broker(&self) -> &OutboxBroker {
        &self.broker
    }

    /// The subscribers.
    pub fn subscribers(&self) -> impl Iterator<Item = &Subscriber> {
        self.subscribers.iter().map(|s| &**s)
    }

    fn conn_opts(&self, role: &str) -> PgConnectOptions {
        self.broker
            .backend()
            .connect_options()
            .application_name(&format!("{}-{role}", self.application_name))
    }

    /// Starts every subscriber's fetch loop and workers, and the LISTEN loop.
    /// Returns once they are spawned. Starting a running engine is an error;
    /// starting a stopped one works.
    pub async fn start(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        if state.is_some() {
            return Err(Error::config("the engine is already running"));
        }
        if self.subscribers.is_empty() {
            return Err(Error::config(
                "the engine has no subscribers; add one with Engine::subscriber",
            ));
        }
        let memory = self.broker.backend().is_local();
        let sync = self.broker.observer().synchronous();
        let mut subs = Vec::with_capacity(self.subscribers.len());
        for sub in &self.subscribers {
            let shared = Arc::new(SubShared::new(
                sub.clone(),
                self.broker.clone(),
                self.conn_opts("fetch"),
                self.conn_opts("worker"),
            ));
            if sync {
                // Synchronous dispatch: the observer delivers in its caller's
                // task (`EngineHandle::dispatch_round`); no loop runs.
                subs.push(SubRuntime {
                    shared,
                    fetch: Vec::new(),
                    workers: Vec::new(),
                    acker: None,
                    heartbeat: None,
                });
                continue;
            }
            if sub.lanes().is_some() {
                if memory {
                    return Err(Error::config(format!(
                        "subscriber `{}` is exactly-once (lanes), which needs PostgreSQL \
                         (session advisory locks); the in-memory store cannot run it",
                        sub.name()
                    )));
                }
                // One lane manager: it takes free lanes and runs a task per
                // owned lane (docs/exactly-once.md).
                let manager = tokio::spawn(lane::run(shared.clone()));
                tracing::info!(
                    subscriber = %sub.name(),
                    queues = ?sub.queues(),
                    lanes = sub.lanes().map(|l| l.lanes),
                    batch = sub.options().get_fetch_batch_size(),
                    "outbox subscriber started (exactly-once lanes)"
                );
                subs.push(SubRuntime {
                    shared,
                    fetch: vec![manager],
                    workers: Vec::new(),
                    acker: None,
                    heartbeat: None,
                });
                continue;
            }
            if shared.in_lots() {
                // Each lot loop claims, handles and commits its own lots.
                let lots = (0..sub.options().get_fetch_concurrency())
                    .map(|_| tokio::spawn(lot::run(shared.clone())))
                    .collect();
                tracing::info!(
                    subscriber = %sub.name(),
                    queues = ?sub.queues(),
                    lots = sub.options().get_fetch_concurrency(),
                    batch = sub.options().get_fetch_batch_size(),
                    "outbox subscriber started (claim mode: transaction)"
                );
                let heartbeat = heartbeat::spawn(&shared);
                subs.push(SubRuntime {
                    shared,
                    fetch: lots,
                    workers: Vec::new(),
                    acker: None,
                    heartbeat,
                });
                continue;
            }
            let fetch = (0..sub.options().get_fetch_concurrency())
                .map(|_| tokio::spawn(fetch::run(shared.clone())))
                .collect();
            let (acks, acks_rx) = worker::ack_channel(&shared);
            let acker = tokio::spawn(worker::run_acker(shared.clone(), acks_rx));
            let workers = (0..sub.options().get_max_workers())
                .map(|_| tokio::spawn(worker::run(shared.clone(), acks.clone())))
                .collect();
            tracing::info!(
                subscriber = %sub.name(),
                queues = ?sub.queues(),
                workers = sub.options().get_max_workers(),
                "outbox subscriber started"
            );
            let heartbeat = heartbeat::spawn(&shared);
            subs.push(SubRuntime {
                shared,
                fetch,
                workers,
                acker: Some(acker),
                heartbeat,
            });
        }
        // The in-memory backend wakes the fetch loops on publish itself (no
        // LISTEN), and has no tables to sample.
        let listen_status = match &self.listen {
            _ if memory || sync => None,
            ListenMode::Off => None,
            _ => Some(health::ListenStatus::new()),
        };
        let listener = match &self.listen {
            _ if memory || sync => None,
            ListenMode::Off => None,
            mode => {
                let opts = match mode {
                    ListenMode::Custom(o) => (**o).clone(),
                    _ => self.conn_opts("listen"),
                };
                let token = CancellationToken::new();
                let shared = subs.iter().map(|s| s.shared.clone()).collect();
                let task = tokio::spawn(listen::run(
                    opts,
                    self.broker.table().channel(),
                    shared,
                    token.clone(),
                    listen_status
                        .clone()
                        .unwrap_or_else(health::ListenStatus::new),
                ));
                Some((token, task))
            }
        };
        let sampler = self.gauge_interval.filter(|_| !memory).map(|every| {
            let token = CancellationToken::new();
            let mut queues: Vec<String> = self
                .subscribers
                .iter()
                .flat_map(|s| s.queues().iter().cloned())
                .collect();
            queues.sort();
            queues.dedup();
            let task = tokio::spawn(gauges::sample_gauges_every(
                self.broker.clone(),
                queues,
                every,
                token.clone(),
            ));
            (token, task)
        });
        if !memory && !sync {
            // More connections than the server has left: say so once
            // (Engine::connection_budget), without delaying the start.
            let engine = self.clone();
            tokio::spawn(async move { engine.log_connection_budget().await });
            // A table without autovacuum tuning works, slower and slower as
            // dead tuples pile up: say so once, without delaying the start.
            let broker = self.broker.clone();
            tokio::spawn(async move {
                let Ok(pool) = broker.backend().pool_for("autovacuum check") else {
                    return;
                };
                match crate::store::schema::autovacuum_warning(pool, broker.table()).await {
                    Ok(Some(w)) => tracing::warn!(event = "autovacuum_not_tuned", "{w}"),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!("cannot read the outbox table's autovacuum settings: {e}")
                    }
                }
            });
        }
        let observer = self.broker.observer().clone();
        let engine = Arc::new(observe::Attached::new(
            subs.iter().map(|s| s.shared.clone()).collect(),
            observer.clone(),
        ));
        let weak: Arc<dyn EngineHandle> = engine.clone();
        let id = observer.engine_started(Arc::downgrade(&weak));
        *state = Some(Running {
            subs,
            listener,
            listen_status,
            sampler,
            attached: (engine, id),
        });
        Ok(())
    }

    /// Whether the engine is running.
    pub async fn is_running(&self) -> bool {
        self.state.lock().await.is_some()
    }

    /// Readiness: the database answers `SELECT 1` within `timeout` (at most
    /// 5 s) and every loop of every subscriber (fetch loops, workers, acker,
    /// lease heartbeat) and the LISTEN loop are alive.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let alive = {
            let state = self.state.lock().await;
            match &*state {
                None => false,
                Some(r) => {
                    r.subs
                        .iter()
                        .flat_map(SubRuntime::loops)
                        .all(|t| !t.is_finished())
                        && r.listener.as_ref().is_none_or(|(_, t)| !t.is_finished())
                }
            }
        };
        if !alive {
            return false;
        }
        let Ok(pool) = self.broker.backend().pool_for("ping") else {
            return true; // an in-process store always answers
        };
        let probe = sqlx::query("SELECT 1").execute(pool);
        matches!(
            tokio::time::timeout(timeout.min(Duration::from_secs(5)), probe).await,
            Ok(Ok(_))
        )
    }

    /// Stops gracefully: stops claiming, releases the leases of rows claimed
    /// but not started (another replica takes them at once), lets in-flight
    /// handlers finish and flushes batched deletes, all within the broker's
    /// graceful timeout (default 15 s). Subscribers drain concurrently. Rows
    /// whose handlers are still running at the deadline are abandoned to
    /// lease expiry (logged at WARN). Never fails; stopping a stopped engine
    /// does nothing.
    pub async fn stop(&self) -> StopReport {
        let Some(running) = self.state.lock().await.take() else {
            return StopReport::default();
        };
        running.detach();
        let deadline = Instant::now() + self.broker.get_graceful_timeout();
        for s in &running.subs {
            s.shared.stop_fetch.cancel();
        }
        if let Some((token, _)) = &running.listener {
            token.cancel();
        }
        if let Some((token, task)) = running.sampler {
            token.cancel();
            let _ = task.await;
        }
        let results = join_all(
            running
                .subs
                .into_iter()
                .map(|s| drain(s, deadline, self.broker.clone())),
        )
        .await;
        if let Some((_, task)) = running.listener {
            task.abort();
            let _ = task.await;
        }
        let mut report = StopReport::default();
        for (released, timed_out) in results {
            report.released += released;
            if let Some(name) = timed_out {
                report.timed_out.push(name);
            }
        }
        report
    }

    /// Stops without draining, as a crash would: every task is aborted, no
    /// lease is released, buffered deletes are not flushed. Rows in flight
    /// are redelivered after their lease expires. For tests of crash safety.
    pub async fn abort(&self) {
        let Some(running) = self.state.lock().await.take() else {
            return;
        };
        running.detach();
        let mut tasks = Vec::new();
        for s in running.subs {
            let overdue = s.shared.take_overdue();
            for w in s
                .fetch
                .into_iter()
                .chain(s.workers)
                .chain(s.acker)
                .chain(overdue)
                .chain(s.heartbeat.map(|(_, task)| task))
            {
                w.abort();
                tasks.push(w);
            }
        }
        for (_, t) in running.listener.into_iter().chain(running.sampler) {
            t.abort();
            tasks.push(t);
        }
        join_all(tasks).await;
    }
}

/// Drains a subscriber of lots: each lot loop lets its lot's started
/// handlers finish and commits (rows not started yet are released by that
/// commit), then exits. A lot still open at the deadline is aborted: its
/// connection closes and the server rolls it back, so its rows are
/// claimable again at once.
async fn drain_lots(
    s: SubRuntime,
    deadline: Instant,
    broker: &OutboxBroker,
) -> (usize, Option<String>) {
    let name = s.shared.sub.name().to_owned();
    let mut timed_out = false;
    // The lots first (one may still reach `max_hold` and hand rows over to
    // their lease), then the rows that outlived `max_hold`.
    let wait_for = |tasks: Vec<JoinHandle<()>>| async move {
        let mut late = false;
        for mut task in tasks {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(remaining, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
                late = true;
            }
        }
        late
    };
    timed_out |= wait_for(s.fetch).await;
    timed_out |= wait_for(s.shared.take_overdue()).await;
    s.shared.stop_workers.cancel();
    if timed_out {
        s.shared.metrics.drain_timeout();
        tracing::warn!(
            event = "drain_timeout",
            subscriber = %name,
            "outbox drain timed out after {:?}; the open lots were rolled back and their rows \
             are claimable again",
            broker.get_graceful_timeout()
        );
    }
    heartbeat::stop(s.heartbeat).await;
    let released = s.shared.released.load(SeqCst);
    (released, timed_out.then_some(name))
}

/// Drains one subscriber; returns (rows released, name if timed out).
async fn drain(s: SubRuntime, deadline: Instant, broker: OutboxBroker) -> (usize, Option<String>) {
    let name = s.shared.sub.name().to_owned();
    let remaining = || deadline.saturating_duration_since(Instant::now());
    if s.shared.in_lots() || s.shared.sub.lanes().is_some() {
        return drain_lots(s, deadline, &broker).await;
    }
    // 1. The fetch loop finishes an in-progress claim (its rows land in the
    //    buffer), then exits.
    for mut fetch in s.fetch {
        if tokio::time::timeout(remaining(), &mut fetch).await.is_err() {
            fetch.abort();
        }
    }
    // 2. Workers stop taking rows; what is left in the buffer was never
    //    started: release those leases.
    s.shared.stop_workers.cancel();
    let unstarted: Vec<Arc<Delivery>> = {
        let mut rx = s.shared.rx.lock().await;
        let mut v = Vec::new();
        while let Ok(d) = rx.try_recv() {
            v.push(d);
        }
        v
    };
    let mut released = 0;
    if !unstarted.is_empty() {
        let ids = unstarted.iter().map(|d| d.row.id).collect();
        let tokens = unstarted.iter().map(|d| d.token).collect();
        let release = async {
            let mut conn = broker.store_conn(&s.shared.conn_opts).await?;
            store::release(broker.stmts(), &mut conn, ids, tokens).await
        };
        let result = tokio::time::timeout(remaining().max(Duration::from_secs(1)), release).await;
        let ok = matches!(result, Ok(Ok(_)));
        for d in &unstarted {
            s.shared
                .finished(d, if ok { Step::Released } else { Step::Abandoned });
        }
        match result {
            Ok(Ok(n)) => {
                released = usize::try_from(n).unwrap_or(usize::MAX);
                tracing::info!(subscriber = %name, released, "released unstarted rows");
            }
            Ok(Err(e)) => tracing::warn!(
                subscriber = %name,
                "could not release {} unstarted rows ({e}); they are redelivered after the lease expires",
                unstarted.len()
            ),
            Err(_) => tracing::warn!(
                subscriber = %name,
                "releasing {} unstarted rows timed out; they are redelivered after the lease expires",
                unstarted.len()
            ),
        }
    }
    // 3. In-flight handlers finish and write their outcomes; the acker
    //    writes the last deletes once every worker is gone.
    let mut timed_out = false;
    for mut w in s.workers {
        if tokio::time::timeout(remaining(), &mut w).await.is_err() {
            w.abort();
            let _ = w.await;
            timed_out = true;
        }
    }
    if let Some(mut acker) = s.acker {
        let acker_budget = remaining().max(ACKER_FINAL_FLUSH);
        if tokio::time::timeout(acker_budget, &mut acker)
            .await
            .is_err()
        {
            acker.abort();
            let _ = acker.await;
            timed_out = true;
        }
    }
    if timed_out {
        s.shared.metrics.drain_timeout();
        tracing::warn!(
            event = "drain_timeout",
            subscriber = %name,
            "outbox drain timed out after {:?}; in-flight rows are abandoned to lease-expiry redelivery",
            broker.get_graceful_timeout()
        );
    }
    // 4. The last outcomes are written (or abandoned): no lease to extend.
    heartbeat::stop(s.heartbeat).await;
    (released, timed_out.then_some(name))
}
