//! [`TestApp`]: an [`App`] whose outbox lives in memory (or, opt-in, in a
//! real PostgreSQL table), with assertions on what happened.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

use super::harness::{Call, Harness, History};
use crate::app::{App, AppContext, AppHandle, Hook, IntoRoute};
use crate::broker::OutboxBroker;
use crate::error::{DecodeError, Error, Result};
use crate::ops::{DeadLetter, DlqFilter};
use crate::publish::PublishOptions;
use crate::store::OutboxRow;
use crate::store::clock::TestClock;
use crate::store::memory::MemoryStore;
use crate::transport::Transport;

/// How long [`TestApp::settle`] waits by default.
pub const DEFAULT_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

type AppOp = Box<dyn FnOnce(App) -> App + Send>;

enum Backend {
    Memory {
        clock: TestClock,
        dead_letters: bool,
    },
    Postgres(OutboxBroker),
    /// A private schema in this database, dropped at stop.
    Scratch(String),
}

/// Builds a [`TestApp`]: the same registrations as an [`App`] (routes,
/// transports, state, discovery), plus where the outbox lives and how rows
/// are delivered. Start it with [`start`](Self::start).
///
/// ```
/// use outbox_core::testing::{TestApp, TestClock};
/// use outbox_core::{MemoryTransport, Message, Route};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), outbox_core::Error> {
/// let route = Route::builder(["orders"]).handler(|msg: Message, _ctx| async move {
///     println!("got {}", msg.id());
/// });
/// let app = TestApp::builder()
///     .without_discovery()
///     .subscriber(route)
///     .transport(MemoryTransport::new("kafka"))
///     .clock(TestClock::frozen())
///     .start()
///     .await?;
/// app.publish(&1_i64, "orders").await?;
/// assert!(app.rows().await?.is_empty());
/// # app.stop().await }
/// ```
pub struct TestAppBuilder {
    backend: Backend,
    sync: bool,
    settle_timeout: Duration,
    ops: Vec<AppOp>,
}

impl fmt::Debug for TestAppBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestAppBuilder")
            .field(
                "backend",
                &match &self.backend {
                    Backend::Memory { .. } => "memory",
                    Backend::Postgres(_) | Backend::Scratch(_) => "postgres",
                },
            )
            .field("sync", &self.sync)
            .field("settle_timeout", &self.settle_timeout)
            .finish_non_exhaustive()
    }
}

impl TestAppBuilder {
    fn op(mut self, f: impl FnOnce(App) -> App + Send + 'static) -> Self {
        self.ops.push(Box::new(f));
        self
    }

    /// Registers a route, as [`App::subscriber`] does: a `#[subscriber]`
    /// fn's marker (`handle {}`) or a [`Route`](crate::Route).
    ///
    /// ```
    /// # use outbox_core::{Message, Route};
    /// let b = outbox_core::testing::TestApp::builder()
    ///     .subscriber(Route::builder(["q"]).handler(|_m: Message, _c| async {}));
    /// # let _ = b;
    /// ```
    pub fn subscriber(self, route: impl IntoRoute) -> Self {
        let route = route.into_route();
        self.op(move |app| app.subscriber(route))
    }

    /// Uses only explicitly registered routes, as [`App::without_discovery`].
    /// By default, as with [`App`], every `#[subscriber]` linked into the test
    /// binary is registered too.
    ///
    /// ```
    /// let b = outbox_core::testing::TestApp::builder().without_discovery();
    /// # let _ = b;
    /// ```
    pub fn without_discovery(self) -> Self {
        self.op(App::without_discovery)
    }

    /// Registers a transport, as [`App::transport`] does; use a
    /// [`MemoryTransport`](crate::MemoryTransport) (a clone of it stays with
    /// the test to read what was published and to inject failures).
    ///
    /// ```
    /// use outbox_core::MemoryTransport;
    /// let kafka = MemoryTransport::new("kafka");
    /// let b = outbox_core::testing::TestApp::builder().transport(kafka.clone());
    /// # let _ = b;
    /// ```
    pub fn transport(self, transport: impl Transport) -> Self {
        self.op(move |app| app.transport(transport))
    }

    /// Registers an [`OutboxTransport`](crate::OutboxTransport) on the
    /// harness's own outbox, as [`App::outbox_transport`]: results published
    /// to `outbox` become rows of the harness, handled like any other.
    ///
    /// ```
    /// let b = outbox_core::testing::TestApp::builder().outbox_transport();
    /// # let _ = b;
    /// ```
    pub fn outbox_transport(self) -> Self {
        self.op(App::outbox_transport)
    }

    /// Shares state with handlers (`State<S>` parameters), as [`App::state`].
    ///
    /// ```
    /// let b = outbox_core::testing::TestApp::builder().state(String::from("config"));
    /// # let _ = b;
    /// ```
    pub fn state<S: Send + Sync + 'static>(self, value: S) -> Self {
        self.op(move |app| app.state(value))
    }

    /// Anything else on the [`App`] (hooks, engine settings), applied before
    /// it starts.
    ///
    /// ```
    /// use outbox_core::AppContext;
    /// let b = outbox_core::testing::TestApp::builder()
    ///     .configure(|app| app.on_startup(|_ctx: AppContext| async { println!("starting") }));
    /// # let _ = b;
    /// ```
    pub fn configure(self, f: impl FnOnce(App) -> App + Send + 'static) -> Self {
        self.op(f)
    }

    /// The clock of the in-memory store (default [`TestClock::system`]).
    /// Ignored on PostgreSQL.
    ///
    /// ```
    /// use outbox_core::testing::{TestApp, TestClock};
    /// let b = TestApp::builder().clock(TestClock::frozen());
    /// # let _ = b;
    /// ```
    pub fn clock(mut self, clock: TestClock) -> Self {
        if let Backend::Memory { clock: c, .. } = &mut self.backend {
            *c = clock;
        }
        self
    }

    /// Deletes terminal failures instead of moving them to the in-memory
    /// dead-letter table (which exists by default). On PostgreSQL the
    /// broker's own configuration applies.
    ///
    /// ```
    /// let b = outbox_core::testing::TestApp::builder().without_dead_letter_table();
    /// # let _ = b;
    /// ```
    pub fn without_dead_letter_table(mut self) -> Self {
        if let Backend::Memory { dead_letters, .. } = &mut self.backend {
            *dead_letters = false;
        }
        self
    }

    /// Runs the real subscriber engine (fetch loops, workers, acker) instead
    /// of dispatching synchronously: publishes return once the row is
    /// stored, and the engine picks it up in the background (wait with
    /// [`TestApp::settle`]). For concurrency, lease expiry while a handler
    /// runs, graceful stops.
    ///
    /// ```
    /// let b = outbox_core::testing::TestApp::builder().loop_mode();
    /// # let _ = b;
    /// ```
    pub fn loop_mode(mut self) -> Self {
        self.sync = false;
        self
    }

    /// Stores the outbox in real PostgreSQL: `broker`'s pool and tables
    /// (migrated, ideally private to the test), driving the same engine code;
    /// the test itself does not change. Publishes commit in a transaction
    /// of their own; [`TestApp::advance`] shifts the stored times back
    /// instead of moving a clock.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
    /// use outbox_core::{DlqTable, OutboxBroker, OutboxTable};
    /// let outbox = OutboxBroker::new(pool, OutboxTable::new("outbox_test")?)
    ///     .dead_letter_table(DlqTable::new("outbox_test_dlq")?);
    /// outbox.migrate().await?;
    /// let app = outbox_core::testing::TestApp::builder().postgres(outbox).start().await?;
    /// # app.stop().await }
    /// ```
    pub fn postgres(mut self, broker: OutboxBroker) -> Self {
        self.backend = Backend::Postgres(broker);
        self
    }

    /// Opt-in PostgreSQL, from the environment: when the variable `var` holds
    /// a database URL, the app runs on real PostgreSQL in a private schema
    /// (`outbox_test_<random>`, with the outbox and dead-letter tables)
    /// that [`TestApp::stop`] drops; when it is unset or empty, in memory.
    /// The same test then runs both ways:
    ///
    /// ```sh
    /// cargo test                                                   # in memory
    /// OUTBOX_TEST_POSTGRES=postgres://localhost/scratch cargo test # on PostgreSQL
    /// ```
    ///
    /// ```
    /// let b = outbox_core::testing::TestApp::builder().postgres_from_env("OUTBOX_TEST_POSTGRES");
    /// # let _ = b;
    /// ```
    pub fn postgres_from_env(mut self, var: &str) -> Self {
        if let Ok(url) = std::env::var(var)
            && !url.trim().is_empty()
        {
            self.backend = Backend::Scratch(url);
        }
        self
    }

    /// How long [`TestApp::settle`] waits before failing (default 10 s).
    ///
    /// ```
    /// let b = outbox_core::testing::TestApp::builder()
    ///     .settle_timeout(std::time::Duration::from_secs(2));
    /// # let _ = b;
    /// ```
    pub fn settle_timeout(mut self, timeout: Duration) -> Self {
        self.settle_timeout = timeout;
        self
    }

    /// Starts the app: runs [`App::run`] in the background (startup hooks,
    /// the transport and state checks, the engine) and returns once it is
    /// up. Fails with the error `App::run` would fail with.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // No subscriber at all: refused, as App::run refuses it.
    /// let err = outbox_core::testing::TestApp::builder().without_discovery().start().await;
    /// assert!(err.unwrap_err().to_string().contains("no subscribers registered"));
    /// # }
    /// ```
    pub async fn start(self) -> Result<TestApp> {
        let mut scratch = None;
        let (harness, broker) = match self.backend {
            Backend::Memory {
                clock,
                dead_letters,
            } => {
                let store = Arc::new(MemoryStore::with_clock(clock));
                let harness = Harness::new(Some(store.clone()), self.sync);
                let broker = super::memory_broker(store, harness.clone(), dead_letters)?;
                (harness, broker)
            }
            Backend::Postgres(broker) => {
                let harness = Harness::new(None, self.sync);
                (harness.clone(), broker.observed_by(harness))
            }
            Backend::Scratch(url) => {
                let (broker, schema) = super::scratch_broker(&url).await?;
                scratch = Some(schema);
                let harness = Harness::new(None, self.sync);
                (harness.clone(), broker.observed_by(harness))
            }
        };
        let mut app = App::new(broker.clone()).without_signals();
        for op in self.ops {
            app = op(app);
        }
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        app = app.after_startup(Hook::new(
            "outbox_core::testing::ready",
            move |_ctx: AppContext| async move {
                let _ = ready_tx.send(());
            },
        ));
        let ctx = app.context().clone();
        let handle = app.handle();
        let task = tokio::spawn(app.run());
        if ready_rx.await.is_err() {
            // The app stopped before its last after_startup hook ran.
            let err = match task.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::config("the test app stopped during startup"),
                Err(e) => Error::config(format!("the test app panicked during startup: {e}")),
            };
            if let Some(schema) = &scratch {
                let _ = super::drop_scratch(&broker, schema).await;
            }
            return Err(err);
        }
        let app = TestApp {
            harness,
            broker,
            ctx,
            handle,
            run: std::sync::Mutex::new(Some(task)),
            settle_timeout: self.settle_timeout,
            scratch: std::sync::Mutex::new(scratch),
        };
        if app.harness.is_sync() {
            app.harness.dispatch_due().await?;
        }
        Ok(app)
    }
}

/// An application under test: your routes, transports and state, run by the
/// real runtime and engine, with the outbox in memory (no PostgreSQL, no bus),
/// or opt-in in a real PostgreSQL table.
///
/// Like FastStream's `TestBroker` (and faststream-outbox's
/// `TestOutboxBroker`), storage is fake and everything else is real:
///
/// - **publishing** goes through the real producer path (the same
///   validation and errors, the same envelope: content type, correlation
///   id, headers);
/// - **delivery** runs the engine's own per-delivery pipeline:
///   `max_deliveries`, the handler with its extractors, the ack policy, the
///   retry strategy, the `#[publish_to]` transports, dead letters. By
///   default it is **synchronous**: [`publish`](Self::publish) returns after
///   the handler of every due row ran and its outcome was written. With
///   [`TestAppBuilder::loop_mode`], the real fetch loops, workers and acker
///   run in the background instead;
/// - **storage** is a [`MemoryStore`] with the semantics of the engine's SQL
///   (claims, lease tokens, retry schedules, dead letters, timers) on a
///   controllable [`TestClock`]: a retried row becomes due when the clock
///   passes its `next_attempt_at` ([`advance`](Self::advance));
/// - **transports** are whatever you register: a
///   [`MemoryTransport`](crate::MemoryTransport) captures what handlers
///   publish and can fail the next publishes
///   ([`fail_next`](crate::MemoryTransport::fail_next)).
///
/// Rows whose schedule is in the future (`activate_in`, `activate_at`,
/// retries) are delivered once the clock reaches them, not at once (unlike
/// faststream-outbox's synchronous mode, which fires them immediately).
/// Several subscribers on one queue: the first registered takes the row.
///
/// What to assert on: [`MemoryTransport::messages_to`](crate::MemoryTransport::messages_to)
/// (what was relayed), [`calls`](Self::calls) / [`handled`](Self::handled)
/// (what handlers got), [`history`](Self::history) (what the engine did
/// with a row), [`rows`](Self::rows) and [`dead_letters`](Self::dead_letters)
/// (what is stored).
///
/// ```
/// use std::time::Duration;
/// use outbox_core::retry::ConstantRetry;
/// use outbox_core::testing::{TestApp, TestClock};
/// use outbox_core::{BoxError, MemoryTransport, Message, Response, Route};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let kafka = MemoryTransport::new("kafka");
/// let relay = Route::builder(["orders"])
///     .retry(ConstantRetry::new(Duration::from_secs(5)).max_attempts(3))
///     .publish_to("kafka", "orders.kafka")
///     .handler(|msg: Message, _ctx| async move {
///         let order_id: i64 = msg.decode()?;
///         Ok::<_, BoxError>(Response::new(order_id).key(order_id.to_string()))
///     });
/// let app = TestApp::builder()
///     .without_discovery()
///     .subscriber(relay)
///     .transport(kafka.clone())
///     .clock(TestClock::frozen())
///     .start()
///     .await?;
///
/// // Relayed at once.
/// app.publish(&7_i64, "orders").await?;
/// let sent = kafka.messages_to("orders.kafka");
/// assert_eq!((sent[0].payload.as_slice(), sent[0].key.as_deref()), (&b"7"[..], Some(&b"7"[..])));
///
/// // The bus fails twice: retried twice, 5 s apart, then relayed.
/// kafka.fail_next(2);
/// let id = app.publish(&8_i64, "orders").await?;
/// app.advance(Duration::from_secs(5)).await?;
/// app.advance(Duration::from_secs(5)).await?;
/// assert_eq!(app.history(id).to_string(),
///     "claimed(1), retried, claimed(2), retried, claimed(3), acked");
/// assert_eq!(kafka.messages_to("orders.kafka").len(), 2);
/// app.stop().await?;
/// # Ok(()) }
/// ```
pub struct TestApp {
    harness: Arc<Harness>,
    broker: OutboxBroker,
    ctx: AppContext,
    handle: AppHandle,
    run: std::sync::Mutex<Option<JoinHandle<Result<()>>>>,
    settle_timeout: Duration,
    /// The private schema of [`TestAppBuilder::postgres_from_env`].
    scratch: std::sync::Mutex<Option<String>>,
}

impl fmt::Debug for TestApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestApp")
            .field(
                "backend",
                &if self.is_memory() {
                    "memory"
                } else {
                    "postgres"
                },
            )
            .field("sync", &self.harness.is_sync())
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Not stopped explicitly: let the runtime stop in the background.
        self.handle.shutdown();
    }
}

impl TestApp {
    /// A builder: in-memory store on the wall clock, with a dead-letter
    /// table, synchronous dispatch, `#[subscriber]` discovery on (as
    /// [`App::new`]).
    ///
    /// ```
    /// let b = outbox_core::testing::TestApp::builder();
    /// # let _ = b;
    /// ```
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            backend: Backend::Memory {
                clock: TestClock::system(),
                dead_letters: true,
            },
            sync: true,
            settle_timeout: DEFAULT_SETTLE_TIMEOUT,
            ops: Vec::new(),
        }
    }

    /// The broker under test (on the in-memory backend it has no pool:
    /// `try_pool()` is [`Error::Unsupported`]; publish with
    /// [`publish`](Self::publish)).
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) {
    /// println!("{:?}", app.broker().table());
    /// # }
    /// ```
    pub fn broker(&self) -> &OutboxBroker {
        &self.broker
    }

    /// The running application's context (transports, state).
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) {
    /// assert!(app.context().transport("kafka").is_some());
    /// # }
    /// ```
    pub fn context(&self) -> &AppContext {
        &self.ctx
    }

    /// Whether the outbox is in memory (else PostgreSQL).
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) {
    /// if app.is_memory() { println!("no database needed"); }
    /// # }
    /// ```
    pub fn is_memory(&self) -> bool {
        self.harness.store().is_some()
    }

    /// The in-memory store, on that backend.
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) {
    /// if let Some(store) = app.store() { println!("{} rows", store.len()); }
    /// # }
    /// ```
    pub fn store(&self) -> Option<&MemoryStore> {
        self.harness.store().map(|s| &**s)
    }

    /// The in-memory store's clock, on that backend.
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) {
    /// let now = app.clock().map(|c| c.now());
    /// # let _ = now; }
    /// ```
    pub fn clock(&self) -> Option<&TestClock> {
        self.store().map(MemoryStore::clock)
    }

    // -----------------------------------------------------------------------
    // Publishing

    /// Publishes `body` to `queue` through the real producer path, exactly
    /// as [`OutboxBroker::publish`] (same validation, same envelope); in
    /// synchronous mode, returns after the due rows were delivered.
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// let id = app.publish(&serde_json::json!({"order_id": 1}), "orders").await?;
    /// # let _ = id; Ok(()) }
    /// ```
    pub async fn publish<T: Serialize + ?Sized>(&self, body: &T, queue: &str) -> Result<i64> {
        self.publish_with(body, queue, &PublishOptions::default())
            .await?
            // Without a timer id the insert always returns its row.
            .ok_or(crate::error::Error::Database(sqlx::Error::RowNotFound))
    }

    /// [`publish`](Self::publish) with options (headers, correlation id,
    /// `activate_in` / `activate_at`, timers), as [`OutboxBroker::publish_with`].
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// use outbox_core::{PublishOptions, TimerConflict};
    /// let opts = PublishOptions::new()
    ///     .activate_in(std::time::Duration::from_secs(60))
    ///     .timer_id("order-7-reminder")
    ///     .timer_conflict(TimerConflict::Extend);
    /// app.publish_with(&7_i64, "reminders", &opts).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_with<T: Serialize + ?Sized>(
        &self,
        body: &T,
        queue: &str,
        opts: &PublishOptions,
    ) -> Result<Option<i64>> {
        let b = &self.broker;
        let id = b
            .on_own_conn(async |c| b.publish_on(body, queue, opts, c).await)
            .await?;
        self.delivered().await?;
        Ok(id)
    }

    /// Publishes many rows at once, as [`OutboxBroker::publish_batch`].
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// assert_eq!(app.publish_batch([1_i64, 2, 3], "orders").await?, 3);
    /// # Ok(()) }
    /// ```
    pub async fn publish_batch<T, I>(&self, bodies: I, queue: &str) -> Result<u64>
    where
        I: IntoIterator<Item = T>,
        T: Serialize,
    {
        self.publish_batch_with(bodies, queue, &PublishOptions::default())
            .await
    }

    /// [`publish_batch`](Self::publish_batch) with shared options, as
    /// [`OutboxBroker::publish_batch_with`].
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// let opts = outbox_core::PublishOptions::new().header("x-tenant", "acme");
    /// app.publish_batch_with(["a", "b"], "letters", &opts).await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_batch_with<T, I>(
        &self,
        bodies: I,
        queue: &str,
        opts: &PublishOptions,
    ) -> Result<u64>
    where
        I: IntoIterator<Item = T>,
        T: Serialize,
    {
        let b = &self.broker;
        let n = b
            .on_own_conn(async |c| b.publish_batch_on(bodies, queue, opts, c).await)
            .await?;
        self.delivered().await?;
        Ok(n)
    }

    /// Cancels the live, unleased timer row `(queue, timer_id)`, as
    /// [`OutboxBroker::cancel_timer`].
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// let cancelled = app.cancel_timer("reminders", "order-7-reminder").await?;
    /// # let _ = cancelled; Ok(()) }
    /// ```
    pub async fn cancel_timer(&self, queue: &str, timer_id: &str) -> Result<bool> {
        let b = &self.broker;
        b.on_own_conn(async |c| b.cancel_timer_on(queue, timer_id, c).await)
            .await
    }

    /// After a publish or a clock move: synchronous mode delivers what is
    /// due now.
    async fn delivered(&self) -> Result<()> {
        if self.harness.is_sync() {
            self.harness.dispatch_due().await?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------
    // Time

    /// Moves time forward by `by`: rows scheduled (retries, `activate_in`,
    /// timers) or leased (lease expiry) up to then become due, and, in
    /// synchronous mode, are delivered before this returns (in loop mode the
    /// subscribers are woken; [`settle`](Self::settle) waits for them).
    ///
    /// In memory this moves the store's [`TestClock`]. On PostgreSQL, whose
    /// clock cannot move, it shifts every stored time of the outbox and
    /// dead-letter tables back by `by`, which is the same for every
    /// comparison the engine makes (but not for an absolute `activate_at`
    /// published afterwards).
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// app.advance(std::time::Duration::from_secs(60)).await?; // the retry scheduled in 60 s ran
    /// # Ok(()) }
    /// ```
    pub async fn advance(&self, by: Duration) -> Result<()> {
        match self.harness.store() {
            Some(store) => store.advance(by),
            None => super::shift_postgres(&self.broker, by).await?,
        }
        self.harness.changed();
        if self.harness.is_sync() {
            self.harness.dispatch_due().await?;
        } else {
            self.harness.wake_all();
        }
        Ok(())
    }

    /// Waits until the engine is idle: no row of a served queue is due (or
    /// has an expired lease) and no delivery is in flight. In synchronous
    /// mode, delivers what is due now. Fails after the settle timeout
    /// (default 10 s) with what was still pending.
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// app.publish(&1_i64, "orders").await?;
    /// app.settle().await?; // loop mode: the handler ran, its outcome is written
    /// # Ok(()) }
    /// ```
    pub async fn settle(&self) -> Result<()> {
        if self.harness.is_sync() {
            self.harness.dispatch_due().await?;
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.settle_timeout;
        loop {
            let notified = self.harness.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Due rows first, then what is in flight: a row claimed in
            // between is counted by the second check.
            let due = self.has_due().await?;
            let busy = self.harness.busy();
            if !due && busy == 0 {
                return Ok(());
            }
            if due {
                self.harness.wake_all();
            }
            let tick = tokio::time::sleep(Duration::from_millis(10));
            tokio::select! {
                _ = notified => {}
                _ = tick => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "TestApp::settle after {:?} ({busy} deliveries in flight, due rows left: {due})",
                    self.settle_timeout
                )));
            }
        }
    }

    async fn has_due(&self) -> Result<bool> {
        let subs = self.harness.subscriptions();
        match self.harness.store() {
            Some(store) => Ok(subs
                .iter()
                .any(|(queues, lease, ordered)| store.has_claimable(queues, *lease, *ordered))),
            None => {
                for (queues, lease, ordered) in &subs {
                    if super::postgres_has_claimable(&self.broker, queues, *lease, *ordered).await?
                    {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        }
    }

    // -----------------------------------------------------------------------
    // Assertions

    /// The rows in the outbox, by id (pending, scheduled, retrying, leased).
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// assert!(app.rows().await?.is_empty(), "everything was handled");
    /// # Ok(()) }
    /// ```
    pub async fn rows(&self) -> Result<Vec<OutboxRow>> {
        let b = &self.broker;
        b.on_own_conn(async |c| b.fetch_unprocessed_on(None, i64::MAX, c).await)
            .await
    }

    /// The row `id`, if it is still in the outbox.
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp, id: i64) -> Result<(), outbox_core::Error> {
    /// let row = app.row(id).await?.expect("still there");
    /// assert_eq!(row.attempts_count, 1);
    /// # Ok(()) }
    /// ```
    pub async fn row(&self, id: i64) -> Result<Option<OutboxRow>> {
        Ok(self.rows().await?.into_iter().find(|r| r.id == id))
    }

    /// The dead letters, by id (empty without a dead-letter table).
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// let dead = app.dead_letters().await?;
    /// assert_eq!(dead[0].failure_reason, "retry_terminal");
    /// # Ok(()) }
    /// ```
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        if let Some(store) = self.harness.store() {
            return Ok(store.dead_letters());
        }
        if self.broker.dlq().is_none() {
            return Ok(Vec::new());
        }
        self.broker.dlq_list(&DlqFilter::all()).await
    }

    /// What the engine did with row `id`, in order: claims and outcomes
    /// (see [`Step`](super::Step)).
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp, id: i64) {
    /// let h = app.history(id);
    /// assert_eq!(h.retries(), 2);
    /// assert_eq!(h.failure_reason(), Some(outbox_core::FailureReason::RetryTerminal));
    /// # }
    /// ```
    pub fn history(&self, id: i64) -> History {
        self.harness.history(id)
    }

    /// Every handler invocation so far, in order (a redelivery is another call).
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) {
    /// for call in app.calls() {
    ///     println!("{} handled row {}", call.subscriber, call.row.id);
    /// }
    /// # }
    /// ```
    pub fn calls(&self) -> Vec<Call> {
        self.harness.calls()
    }

    /// The rows the handlers of `queue` were called with, in order.
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) {
    /// let rows = app.handled("orders");
    /// assert_eq!(rows[0].headers["x-tenant"], "acme");
    /// # }
    /// ```
    pub fn handled(&self, queue: &str) -> Vec<OutboxRow> {
        self.calls()
            .into_iter()
            .filter(|c| c.row.queue == queue)
            .map(|c| c.row)
            .collect()
    }

    /// The bodies the handlers of `queue` were called with, decoded as `T`.
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::DecodeError> {
    /// assert_eq!(app.handled_bodies::<i64>("orders")?, [1]);
    /// # Ok(()) }
    /// ```
    pub fn handled_bodies<T: DeserializeOwned>(
        &self,
        queue: &str,
    ) -> std::result::Result<Vec<T>, DecodeError> {
        self.handled(queue).iter().map(OutboxRow::decode).collect()
    }

    /// Stops the app as a shutdown signal would (hooks, a graceful drain,
    /// transports closed) and returns what [`App::run`] returned. The
    /// assertions keep working afterwards (except on the private schema of
    /// [`TestAppBuilder::postgres_from_env`], which is dropped here);
    /// stopping again does nothing.
    ///
    /// ```
    /// # async fn demo(app: outbox_core::testing::TestApp) -> Result<(), outbox_core::Error> {
    /// app.stop().await?;
    /// assert!(app.rows().await?.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn stop(&self) -> Result<()> {
        self.handle.shutdown();
        let task = self.run.lock().unwrap_or_else(|p| p.into_inner()).take();
        let res = match task {
            Some(task) => task
                .await
                .map_err(|e| Error::config(format!("the test app panicked: {e}")))
                .and_then(|r| r),
            None => Ok(()),
        };
        let scratch = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(schema) = scratch {
            super::drop_scratch(&self.broker, &schema).await?;
        }
        res
    }
}
