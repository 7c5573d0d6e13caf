//! [`OutboxBroker`]: the handle producers publish through and subscribers run on.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, PgPool};

use crate::error::{Error, Result};
use crate::publish::{self, PublishOptions};
use crate::store::conn::{self, Conn, LocalStore};
use crate::store::producer::{self, BatchInsert, Insert};
use crate::store::sql::Statements;
use crate::store::{
    DlqTable, FailureReason, OutboxRow, OutboxTable, QueueStats, SchemaChecks, stats,
};

/// Turns a handler error into the text stored in the dead-letter table's
/// `last_exception` column (`None` stores NULL). Replace it to redact PII.
pub type ErrorRenderer =
    Arc<dyn Fn(&(dyn std::error::Error + Send + Sync + 'static)) -> Option<String> + Send + Sync>;

/// The outbox over one PostgreSQL pool and one table.
///
/// Cheap to clone (everything is behind an `Arc`). Producers call
/// [`publish`](Self::publish) on their own transaction; the subscriber engine
/// ([`crate::Engine`]) and the application runtime use the same handle.
///
/// ```no_run
/// use outbox_core::{OutboxBroker, OutboxTable};
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
/// let outbox = OutboxBroker::new(pool.clone(), OutboxTable::new("outbox")?);
/// outbox.table().migrate(&pool).await?;
///
/// let mut tx = pool.begin().await?;
/// // ... your domain writes on `tx` ...
/// let id = outbox.publish(&serde_json::json!({"order_id": 1}), "orders", &mut *tx).await?;
/// tx.commit().await?; // the row (and its NOTIFY) exist only from here on
/// # let _ = id; Ok(()) }
/// ```
#[derive(Clone)]
pub struct OutboxBroker {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    backend: Backend,
    /// Told what the engine does (the test harness; a no-op by default).
    observer: Arc<dyn Observer>,
    table: OutboxTable,
    dlq: Option<DlqTable>,
    stmts: Arc<Statements>,
    channel: String,
    renderer: Option<ErrorRenderer>,
    graceful_timeout: Duration,
    sync_writes: bool,
    /// The explicit source identity ([`OutboxBroker::source_id`]).
    source_id: Option<Arc<str>>,
}

/// Where a broker's rows live: the one value every storage operation of the
/// broker, the engine and `ops` goes through.
#[derive(Clone)]
pub(crate) enum Backend {
    /// PostgreSQL, through this pool (the product).
    Postgres(PgPool),
    /// A backend in the process: the test harness's in-memory store. Only the
    /// harness (feature `testing`) builds one; everything else treats it as
    /// one more value of this enum.
    Local(Arc<dyn LocalStore>),
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Backend {
    /// How the backend is named in [`Error::Unsupported`].
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Backend::Postgres(_) => "PostgreSQL",
            Backend::Local(s) => s.name(),
        }
    }

    /// The PostgreSQL pool, or [`Error::Unsupported`] naming `operation`.
    pub(crate) fn pool_for(&self, operation: &'static str) -> Result<&PgPool> {
        match self {
            Backend::Postgres(pool) => Ok(pool),
            Backend::Local(s) => Err(Error::unsupported(operation, s.name())),
        }
    }

    /// Whether the rows live in the process (no database).
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, Backend::Local(_))
    }

    /// The backend's clock: the wall clock on PostgreSQL (as the engine sees
    /// it), the store's own clock in memory.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        match self {
            Backend::Postgres(_) => Utc::now(),
            Backend::Local(s) => s.now(),
        }
    }

    /// The options the engine's own connections start from (the pool's; on
    /// an in-process backend, unused defaults).
    pub(crate) fn connect_options(&self) -> PgConnectOptions {
        match self {
            Backend::Postgres(pool) => (*pool.connect_options()).clone(),
            Backend::Local(_) => PgConnectOptions::new_without_pgpass(),
        }
    }
}

/// One thing the engine did with a row, as recorded by a test harness
/// (public as `outbox_core::testing::Step`, feature `testing`).
///
/// Reported by the engine itself (the fetch loop, the workers, the acker, or
/// synchronous dispatch) through the broker's observer, after the corresponding write landed, identically
/// on the in-memory and the PostgreSQL backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[allow(
    unreachable_pub,
    reason = "public as outbox_core::testing::Step (feature `testing`)"
)]
pub enum Step {
    /// A claim leased the row; `deliveries_count` is the row's count after it.
    Claimed {
        /// Claims so far, this one included.
        deliveries_count: i64,
    },
    /// Handled: the row was deleted.
    Acked,
    /// Nacked: rescheduled `delay` later, lease released.
    Retried {
        /// The retry strategy's delay.
        delay: Duration,
    },
    /// Failed for good and moved to the dead-letter table.
    DeadLettered {
        /// Why (`failure_reason`).
        reason: FailureReason,
        /// The rendered error (`last_exception`).
        last_exception: Option<String>,
    },
    /// Failed for good and deleted (no dead-letter table configured).
    Deleted {
        /// Why.
        reason: FailureReason,
    },
    /// The outcome's write found the lease taken by another claim (`phase`:
    /// `retry` or `terminal`, which also covers acks): nothing was written.
    /// Also reported with `buffered` (the row waited past its lease and was
    /// not handled), and with `heartbeat` while the handler still runs (an
    /// extension found the lease taken; the outcome's write reports its own
    /// step later).
    LeaseLost {
        /// Which write.
        phase: &'static str,
    },
    /// Claimed but never started: the lease was given back at a graceful stop.
    Released,
    /// The outcome could not be written; the row is redelivered after its
    /// lease expires.
    Abandoned,
}

/// Compact and stable (no retry delay, no error text): `claimed(1)`,
/// `acked`, `retried`, `dead_lettered(retry_terminal)`, `deleted(rejected)`,
/// `lease_lost(retry)`, `released`, `abandoned`.
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Claimed { deliveries_count } => write!(f, "claimed({deliveries_count})"),
            Step::Acked => f.write_str("acked"),
            Step::Retried { .. } => f.write_str("retried"),
            Step::DeadLettered { reason, .. } => write!(f, "dead_lettered({reason})"),
            Step::Deleted { reason } => write!(f, "deleted({reason})"),
            Step::LeaseLost { phase } => write!(f, "lease_lost({phase})"),
            Step::Released => f.write_str("released"),
            Step::Abandoned => f.write_str("abandoned"),
        }
    }
}

/// A running engine as an [`Observer`] sees it (the engine implements it):
/// what the test harness needs to wake, count and drive the engine's
/// subscribers without knowing the engine's types.
#[allow(
    dead_code,
    reason = "called by an observer that drives the engine (the test harness, feature `testing`)"
)]
pub(crate) trait EngineHandle: Send + Sync {
    /// Wakes the fetch loops serving `queue` (every one if `None`), as a
    /// NOTIFY would.
    fn wake(&self, queue: Option<&str>);
    /// Claims running plus deliveries in flight.
    fn busy(&self) -> usize;
    /// The queues, lease and ordering of each subscriber.
    fn subscriptions(&self) -> Vec<(Vec<String>, Duration, bool)>;
    /// One round of synchronous dispatch: each subscriber claims its due rows
    /// and delivers them in the caller's task. Returns how many deliveries
    /// ran (0: nothing was due).
    fn dispatch_round(&self) -> BoxFuture<'_, Result<usize>>;
}

/// What the engine (and the producer path) tells whoever watches a broker:
/// the test harness implements it; the default observer ignores everything.
/// Every method has a no-op default.
pub(crate) trait Observer: Send + Sync + fmt::Debug {
    /// Whether the engine runs no loops: the observer delivers rows itself
    /// with [`EngineHandle::dispatch_round`].
    fn synchronous(&self) -> bool {
        false
    }
    /// A publish on an in-process backend inserted (or extended) a row of
    /// `queue`.
    fn inserted(&self, _queue: &str) {}
    /// An engine started on this broker; returns its registration.
    fn engine_started(&self, _engine: std::sync::Weak<dyn EngineHandle>) -> u64 {
        0
    }
    /// The engine registered as `id` is stopping.
    fn engine_stopped(&self, _id: u64) {}
    /// The engine did `step` with row `row_id` (a claim, or the delivery's
    /// outcome); [`changed`](Self::changed) follows once per claim or outcome.
    fn step(&self, _row_id: i64, _step: Step) {}
    /// Something changed (a claim or an outcome was reported).
    fn changed(&self) {}
    /// The handler of `subscriber` is about to run for `row`.
    fn handler_called(&self, _subscriber: &str, _row: &OutboxRow) {}
}

/// The default [`Observer`]: ignores everything.
#[derive(Debug)]
struct NoObserver;

impl Observer for NoObserver {}

impl fmt::Debug for OutboxBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxBroker")
            .field("table", &self.inner.table)
            .field("dlq", &self.inner.dlq)
            .field("graceful_timeout", &self.inner.graceful_timeout)
            .field("source_id", &self.inner.source_id)
            .finish_non_exhaustive()
    }
}

/// Default drain budget of a graceful stop.
pub const DEFAULT_GRACEFUL_TIMEOUT: Duration = Duration::from_secs(15);

impl Inner {
    fn rebuild(&mut self) {
        self.stmts = Arc::new(Statements::new(
            &self.table,
            self.dlq.as_ref(),
            self.sync_writes,
        ));
    }
}

impl OutboxBroker {
    /// An outbox over `pool` and `table`, without a dead-letter table.
    pub fn new(pool: PgPool, table: OutboxTable) -> Self {
        Self::on_backend(Backend::Postgres(pool), table)
    }

    fn on_backend(backend: Backend, table: OutboxTable) -> Self {
        let stmts = Arc::new(Statements::new(&table, None, false));
        Self {
            inner: Arc::new(Inner {
                backend,
                observer: Arc::new(NoObserver),
                channel: table.channel(),
                table,
                dlq: None,
                stmts,
                renderer: None,
                graceful_timeout: DEFAULT_GRACEFUL_TIMEOUT,
                sync_writes: false,
                source_id: None,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// Archives terminal failures into `dlq`, atomically with their deletion
    /// (default: terminal failures are deleted).
    pub fn dead_letter_table(self, dlq: DlqTable) -> Self {
        self.edit(|i| {
            i.dlq = Some(dlq);
            i.rebuild();
        })
    }

    /// Whether the relay's own writes (claims, acks, retries, lease releases,
    /// dead-letter moves) wait for the WAL flush. Default `false`: each of
    /// them sets `synchronous_commit = off` for its own transaction only.
    ///
    /// That is safe for at-least-once delivery: if PostgreSQL crashes, the
    /// last few hundred milliseconds of those writes may be undone, which can
    /// only bring rows back (a redelivery), never lose one. Your own
    /// transactions, and therefore your publishes, are not affected. It makes
    /// per-row acks several times faster (no fsync wait per row). Set `true`
    /// to make acks durable at once (fewer duplicates after a database crash).
    pub fn synchronous_relay_writes(self, on: bool) -> Self {
        self.edit(|i| {
            i.sync_writes = on;
            i.rebuild();
        })
    }

    /// Names this outbox's **source identity** yourself instead of reading it
    /// from PostgreSQL: a short, stable, readable name, unique among the
    /// outboxes that publish to the same bus (`"orders-service"`,
    /// `"billing-eu"`).
    ///
    /// The source identity tells this outbox table's messages from another
    /// table's: row ids are unique within one table only, so transports
    /// combine the identity with the outbox id wherever the bus deduplicates
    /// on an id (NATS: `Nats-Msg-Id` = `<source>:<outbox-id>`). `App::run`
    /// resolves it once at startup ([`resolve_source`](Self::resolve_source))
    /// and stamps it on every [`Outgoing`](crate::Outgoing) as
    /// [`Outgoing::source`](crate::Outgoing::source).
    ///
    /// Without it the identity is read from PostgreSQL:
    /// `<system_identifier>/<database oid>/<schema>.<table>`, unique per
    /// cluster, database and table but not readable. Set it when you want
    /// readable ids, when the relay's role may not run `pg_control_system()`
    /// (the fallback logs a WARN), or when two clusters cloned from one
    /// physical backup (they share a `system_identifier`) publish to the same
    /// bus. Two different tables must never share one: their equal row ids
    /// would be deduplicated against each other and messages lost. Changing
    /// it while rows are in flight only lets a redelivery through as a
    /// duplicate.
    ///
    /// Checked by `App::run` (and `resolve_source`): not empty, one line, at
    /// most 255 bytes.
    ///
    /// ```
    /// # fn demo(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
    /// use outbox_core::{OutboxBroker, OutboxTable};
    /// let outbox = OutboxBroker::new(pool, OutboxTable::new("outbox")?).source_id("orders-service");
    /// assert_eq!(outbox.get_source_id(), Some("orders-service"));
    /// # Ok(()) }
    /// ```
    pub fn source_id(self, id: impl Into<String>) -> Self {
        let id: String = id.into();
        self.edit(|i| i.source_id = Some(Arc::from(id)))
    }

    /// The explicit source identity set with [`source_id`](Self::source_id),
    /// if any.
    pub fn get_source_id(&self) -> Option<&str> {
        self.inner.source_id.as_deref()
    }

    /// This outbox's source identity, as `App::run` resolves it once at
    /// startup: the explicit [`source_id`](Self::source_id) if set (checked),
    /// else `memory/<schema>.<table>` on the in-memory store of the test
    /// harness, else one statement on PostgreSQL:
    /// `<system_identifier>/<database oid>/<schema>.<table>` (the cluster's
    /// `pg_control_system()`, the database's oid, the table's schema as
    /// configured or as the `search_path` resolves it).
    ///
    /// Where `pg_control_system()` is refused (managed services may revoke
    /// it), it falls back to `<server address>:<port>/<database name>/<schema>.<table>`
    /// and logs a WARN: two clusters reached at the same address, port and
    /// database name would then share identities. Control characters and
    /// `%` in names are percent-encoded.
    ///
    /// Fails with [`Error::SourceIdentity`] when PostgreSQL cannot be
    /// reached (`App::run` retries that, with a WARN, until it can) and with
    /// [`Error::InvalidConfig`] for an invalid explicit id.
    pub async fn resolve_source(&self) -> Result<Arc<str>> {
        if let Some(id) = &self.inner.source_id {
            crate::store::source::check_explicit(id)?;
            return Ok(id.clone());
        }
        let id = match self.backend() {
            Backend::Local(_) => crate::store::source::memory(&self.inner.table),
            Backend::Postgres(pool) => crate::store::source::read(pool, &self.inner.table).await?,
        };
        Ok(Arc::from(id))
    }

    /// How long a graceful stop waits for in-flight handlers (default 15 s).
    pub fn graceful_timeout(self, timeout: Duration) -> Self {
        self.edit(|i| i.graceful_timeout = timeout)
    }

    /// Replaces how handler errors are rendered into `last_exception`
    /// (default: the error and its sources, `": "`-separated). The result is
    /// capped at 8 KiB either way.
    pub fn last_exception_renderer<F>(self, f: F) -> Self
    where
        F: Fn(&(dyn std::error::Error + Send + Sync + 'static)) -> Option<String>
            + Send
            + Sync
            + 'static,
    {
        let f: ErrorRenderer = Arc::new(f);
        self.edit(|i| i.renderer = Some(f))
    }

    /// The PostgreSQL pool.
    ///
    /// # Panics
    ///
    /// On the in-memory store of the test harness (feature `testing`), which
    /// has no pool: use [`try_pool`](Self::try_pool) where the broker may be
    /// one (a handler tested with `TestApp`).
    pub fn pool(&self) -> &PgPool {
        match self.try_pool() {
            Ok(pool) => pool,
            Err(e) => panic!("OutboxBroker::pool: {e}"),
        }
    }

    /// The PostgreSQL pool, or [`Error::Unsupported`] on the in-memory store
    /// of the test harness.
    ///
    /// ```no_run
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let mut tx = outbox.try_pool()?.begin().await?;
    /// # let _ = &mut tx; Ok(()) }
    /// ```
    pub fn try_pool(&self) -> Result<&PgPool> {
        self.inner.backend.pool_for("OutboxBroker::pool")
    }

    /// The storage backend.
    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// Whoever watches this broker (a no-op unless a test harness does).
    pub(crate) fn observer(&self) -> &Arc<dyn Observer> {
        &self.inner.observer
    }

    /// An outbox on the in-process store `store` and `table`, without a
    /// dead-letter table. The test harness (feature `testing`) is the only
    /// caller.
    #[allow(
        dead_code,
        reason = "the test harness (feature `testing`) is the only caller"
    )]
    pub(crate) fn local(store: Arc<dyn LocalStore>, table: OutboxTable) -> Self {
        Self::on_backend(Backend::Local(store), table)
    }

    /// This broker, reporting to `observer` (a test harness, feature
    /// `testing`, the only caller).
    #[allow(
        dead_code,
        reason = "the test harness (feature `testing`) is the only caller"
    )]
    pub(crate) fn observed_by(self, observer: Arc<dyn Observer>) -> Self {
        self.edit(|i| i.observer = observer)
    }

    /// The outbox table definition.
    pub fn table(&self) -> &OutboxTable {
        &self.inner.table
    }

    /// The dead-letter table definition, if configured.
    pub fn dlq(&self) -> Option<&DlqTable> {
        self.inner.dlq.as_ref()
    }

    /// The configured drain budget.
    pub fn get_graceful_timeout(&self) -> Duration {
        self.inner.graceful_timeout
    }

    pub(crate) fn stmts(&self) -> &Statements {
        &self.inner.stmts
    }

    pub(crate) fn channel(&self) -> &str {
        &self.inner.channel
    }

    pub(crate) fn renderer(&self) -> Option<&ErrorRenderer> {
        self.inner.renderer.as_ref()
    }

    /// A connection for the engine's statements: the in-process store, or a
    /// new PostgreSQL connection made with `opts`.
    pub(crate) async fn store_conn(&self, opts: &PgConnectOptions) -> Result<Conn, sqlx::Error> {
        match self.backend() {
            Backend::Postgres(_) => conn::connect(opts).await,
            Backend::Local(store) => Ok(Conn::Local(store.clone())),
        }
    }

    /// The per-queue counts of [`stats`](Self::stats) (`None`: every queue)
    /// and [`stats_for`](Self::stats_for) (validated names; none, no
    /// statement), also what the engine's gauge sampler reads.
    pub(crate) async fn queue_stats(&self, queues: Option<&[&str]>) -> Result<Vec<QueueStats>> {
        if let Some(names) = queues {
            for q in names {
                publish::validate_queue(q)?;
            }
            if names.is_empty() {
                return Ok(Vec::new());
            }
        }
        let pool = self.backend().pool_for("stats")?;
        stats::collect(pool, self.table(), self.dlq(), queues).await
    }

    /// Runs `f` (one of the `*_on` methods) where no caller's transaction
    /// exists, as in the test harness: with no connection on the in-memory
    /// backend, else on a pooled connection of its own, in autocommit.
    pub(crate) async fn on_own_conn<T>(
        &self,
        f: impl AsyncFnOnce(Option<&mut PgConnection>) -> Result<T>,
    ) -> Result<T> {
        match self.backend() {
            Backend::Local(_) => f(None).await,
            Backend::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                f(Some(&mut *conn)).await
            }
        }
    }

    /// Creates the outbox table (and the dead-letter table, if configured) where
    /// missing. Idempotent. On the in-memory store of the test harness, whose
    /// tables always exist, it does nothing.
    pub async fn migrate(&self) -> Result<()> {
        let Backend::Postgres(pool) = self.backend() else {
            return Ok(());
        };
        self.inner.table.migrate(pool).await?;
        if let Some(dlq) = &self.inner.dlq {
            dlq.migrate(pool).await?;
        }
        Ok(())
    }

    /// Compares the live tables with what the engine needs: the columns with
    /// their types, nullability and defaults, the two partial indexes and the
    /// unique timer index (matched by columns, predicate and uniqueness, under
    /// any name), the lease CHECK (by predicate), and the dead-letter table when
    /// configured. Extra columns and indexes are fine. Returns
    /// [`Error::SchemaDrift`](crate::Error::SchemaDrift) listing every problem
    /// with the DDL that fixes it. Not run by `migrate` or the engine: call it
    /// from a startup hook or a health check. On the in-memory store of the
    /// test harness: [`Error::Unsupported`].
    pub async fn validate_schema(&self) -> Result<()> {
        self.backend().pool_for("validate_schema")?;
        self.validate_schema_with(SchemaChecks::new()).await
    }

    /// [`validate_schema`](Self::validate_schema) plus the optional checks in
    /// `checks`: with [`SchemaChecks::autovacuum`](crate::SchemaChecks::autovacuum),
    /// also that autovacuum is tuned for a queue table on the outbox table
    /// (reported as drift, with the `ALTER TABLE … SET (…)` that fixes it).
    ///
    /// ```no_run
    /// use outbox_core::{OutboxBroker, SchemaChecks};
    ///
    /// # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
    /// if let Err(outbox_core::Error::SchemaDrift(drift)) =
    ///     outbox.validate_schema_with(SchemaChecks::new().autovacuum(true)).await
    /// {
    ///     eprintln!("{drift}"); // every problem, then the DDL that fixes them
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn validate_schema_with(&self, checks: SchemaChecks) -> Result<()> {
        crate::store::schema::validate(
            self.backend().pool_for("validate_schema_with")?,
            &self.inner.table,
            self.inner.dlq.as_ref(),
            checks,
        )
        .await
    }

    /// Inserts one row on the caller's connection or transaction (`&mut *tx`)
    /// and returns its id. Never begins, flushes or commits anything: the row
    /// and its NOTIFY commit or roll back with the caller's transaction.
    ///
    /// Only a timer publish can be a no-op, so only
    /// [`publish_with`](Self::publish_with) returns an `Option`.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        body: &T,
        queue: &str,
        conn: &mut PgConnection,
    ) -> Result<i64> {
        self.publish_with(body, queue, &PublishOptions::default(), conn)
            .await?
            // Without a timer id the INSERT always returns its row.
            .ok_or(Error::Database(sqlx::Error::RowNotFound))
    }

    /// [`publish`](Self::publish) with headers, a correlation id, a delay or a
    /// timer. With a `timer_id`, returns `None` when the publish was a no-op:
    /// [`TimerConflict::Ignore`](crate::TimerConflict::Ignore) found a live row,
    /// or [`TimerConflict::Extend`](crate::TimerConflict::Extend) found it leased.
    ///
    /// One round trip: the NOTIFY rides on the INSERT's `RETURNING`, and is
    /// skipped for future-dated rows and no-ops.
    pub async fn publish_with<T: Serialize + ?Sized>(
        &self,
        body: &T,
        queue: &str,
        opts: &PublishOptions,
        conn: &mut PgConnection,
    ) -> Result<Option<i64>> {
        self.publish_on(body, queue, opts, Some(conn)).await
    }

    /// [`publish_with`](Self::publish_with) on `conn`, or on the in-memory
    /// backend (which needs no connection).
    pub(crate) async fn publish_on<T: Serialize + ?Sized>(
        &self,
        body: &T,
        queue: &str,
        opts: &PublishOptions,
        conn: Option<&mut PgConnection>,
    ) -> Result<Option<i64>> {
        let res = match publish::prepare(body, queue, opts) {
            Ok(insert) => self.execute_insert(insert, conn).await,
            Err(e) => Err(e),
        };
        match &res {
            Ok(id) => crate::instrument::published(queue, "success", u64::from(id.is_some())),
            Err(_) => crate::instrument::published(queue, "error", 1),
        }
        res
    }

    async fn execute_insert(
        &self,
        insert: Insert,
        conn: Option<&mut PgConnection>,
    ) -> Result<Option<i64>> {
        if let Backend::Local(store) = self.backend() {
            let queue = insert.queue.clone();
            let id = store.insert(insert);
            if id.is_some() {
                self.observer().inserted(&queue);
            }
            return Ok(id);
        }
        producer::insert_pg(self.stmts(), self.channel(), insert, require(conn)?).await
    }

    /// Inserts many rows in one statement (one round trip, one NOTIFY) and
    /// returns how many were inserted. Each row gets its own correlation id.
    pub async fn publish_batch<T, I>(
        &self,
        bodies: I,
        queue: &str,
        conn: &mut PgConnection,
    ) -> Result<u64>
    where
        I: IntoIterator<Item = T>,
        T: Serialize,
    {
        self.publish_batch_with(bodies, queue, &PublishOptions::default(), conn)
            .await
    }

    /// [`publish_batch`](Self::publish_batch) with shared headers and schedule.
    /// A `timer_id` or `correlation_id` in `opts` is an error.
    pub async fn publish_batch_with<T, I>(
        &self,
        bodies: I,
        queue: &str,
        opts: &PublishOptions,
        conn: &mut PgConnection,
    ) -> Result<u64>
    where
        I: IntoIterator<Item = T>,
        T: Serialize,
    {
        self.publish_batch_on(bodies, queue, opts, Some(conn)).await
    }

    /// [`publish_batch_with`](Self::publish_batch_with) on `conn`, or on the
    /// in-memory backend.
    pub(crate) async fn publish_batch_on<T, I>(
        &self,
        bodies: I,
        queue: &str,
        opts: &PublishOptions,
        conn: Option<&mut PgConnection>,
    ) -> Result<u64>
    where
        I: IntoIterator<Item = T>,
        T: Serialize,
    {
        let res = match publish::prepare_batch(bodies, queue, opts) {
            Ok(batch) => self.execute_batch(batch, conn).await,
            Err(e) => Err(e),
        };
        match &res {
            Ok(n) => crate::instrument::published(queue, "success", *n),
            Err(_) => crate::instrument::published(queue, "error", 1),
        }
        res
    }

    async fn execute_batch(
        &self,
        batch: BatchInsert,
        conn: Option<&mut PgConnection>,
    ) -> Result<u64> {
        if let Backend::Local(store) = self.backend() {
            let queue = batch.queue.clone();
            let n = store.insert_batch(batch);
            if n > 0 {
                self.observer().inserted(&queue);
            }
            return Ok(n);
        }
        producer::insert_batch_pg(self.stmts(), self.channel(), batch, require(conn)?).await
    }

    /// Deletes the live, unleased row of `(queue, timer_id)` on the caller's
    /// transaction. `true` if a row was deleted (durable once you commit); a
    /// row being handled right now is not touched.
    pub async fn cancel_timer(
        &self,
        queue: &str,
        timer_id: &str,
        conn: &mut PgConnection,
    ) -> Result<bool> {
        self.cancel_timer_on(queue, timer_id, Some(conn)).await
    }

    /// [`cancel_timer`](Self::cancel_timer) on `conn`, or on the in-memory
    /// backend.
    pub(crate) async fn cancel_timer_on(
        &self,
        queue: &str,
        timer_id: &str,
        conn: Option<&mut PgConnection>,
    ) -> Result<bool> {
        publish::validate_cancel(queue, timer_id)?;
        if let Backend::Local(store) = self.backend() {
            return Ok(store.cancel_timer(queue, timer_id));
        }
        producer::cancel_timer_pg(self.stmts(), queue, timer_id, require(conn)?).await
    }

    /// Reads up to `limit` rows (all queues, or one), ordered by id, without
    /// leasing them: for inspection and tests.
    pub async fn fetch_unprocessed(
        &self,
        queue: Option<&str>,
        limit: i64,
        conn: &mut PgConnection,
    ) -> Result<Vec<OutboxRow>> {
        self.fetch_unprocessed_on(queue, limit, Some(conn)).await
    }

    /// [`fetch_unprocessed`](Self::fetch_unprocessed) on `conn`, or on the
    /// in-memory backend.
    pub(crate) async fn fetch_unprocessed_on(
        &self,
        queue: Option<&str>,
        limit: i64,
        conn: Option<&mut PgConnection>,
    ) -> Result<Vec<OutboxRow>> {
        publish::validate_unprocessed(queue, limit)?;
        if let Backend::Local(store) = self.backend() {
            return Ok(store.fetch_unprocessed(queue, limit));
        }
        producer::fetch_unprocessed_pg(self.stmts(), queue, limit, require(conn)?).await
    }
}

/// The connection a PostgreSQL statement runs on; only the in-memory backend
/// runs without one.
fn require(conn: Option<&mut PgConnection>) -> Result<&mut PgConnection> {
    conn.ok_or_else(|| Error::config("this outbox has no in-memory backend; pass a connection"))
}
