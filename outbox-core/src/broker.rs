//! [`OutboxBroker`]: the handle producers publish through and subscribers run on.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, PgPool};

use crate::error::Result;
use crate::publish::{self, PublishOptions};
use crate::store::conn::{self, Conn};
use crate::store::producer::{self, BatchInsert, Insert};
use crate::store::sql::Statements;
use crate::store::{DlqTable, OutboxRow, OutboxTable, QueueStats, SchemaChecks, stats};

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
    pool: PgPool,
    table: OutboxTable,
    dlq: Option<DlqTable>,
    stmts: Arc<Statements>,
    channel: String,
    renderer: Option<ErrorRenderer>,
    graceful_timeout: Duration,
    sync_writes: bool,
    /// The test harness attached to this broker (feature `testing`): the
    /// in-memory storage backend, if any, and the journal of deliveries.
    #[cfg(feature = "testing")]
    harness: Option<Arc<crate::testing::Harness>>,
}

impl fmt::Debug for OutboxBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxBroker")
            .field("table", &self.inner.table)
            .field("dlq", &self.inner.dlq)
            .field("graceful_timeout", &self.inner.graceful_timeout)
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
        let stmts = Arc::new(Statements::new(&table, None, false));
        Self {
            inner: Arc::new(Inner {
                pool,
                channel: table.channel(),
                table,
                dlq: None,
                stmts,
                renderer: None,
                graceful_timeout: DEFAULT_GRACEFUL_TIMEOUT,
                sync_writes: false,
                #[cfg(feature = "testing")]
                harness: None,
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

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
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

    /// Attaches a test harness (feature `testing`; see [`crate::testing`]).
    #[cfg(feature = "testing")]
    pub(crate) fn with_harness(self, harness: Arc<crate::testing::Harness>) -> Self {
        self.edit(|i| i.harness = Some(harness))
    }

    /// The attached test harness, if any.
    #[cfg(feature = "testing")]
    pub(crate) fn harness(&self) -> Option<&Arc<crate::testing::Harness>> {
        self.inner.harness.as_ref()
    }

    /// The in-memory storage backend, if this broker has one.
    #[cfg(feature = "testing")]
    pub(crate) fn memory(&self) -> Option<&Arc<crate::store::memory::MemoryStore>> {
        self.inner.harness.as_ref().and_then(|h| h.store())
    }

    /// A connection for the engine's statements: the in-memory store when
    /// this broker has one (feature `testing`), else a new PostgreSQL
    /// connection made with `opts`.
    pub(crate) async fn store_conn(&self, opts: &PgConnectOptions) -> Result<Conn, sqlx::Error> {
        #[cfg(feature = "testing")]
        if let Some(store) = self.memory() {
            return Ok(Conn::Memory(store.clone()));
        }
        conn::connect(opts).await
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
        stats::collect(self.pool(), self.table(), self.dlq(), queues).await
    }

    /// Runs `f` (one of the `*_on` methods) where no caller's transaction
    /// exists, as in the test harness: with no connection on the in-memory
    /// backend, else on a pooled connection of its own, in autocommit.
    pub(crate) async fn on_own_conn<T>(
        &self,
        f: impl AsyncFnOnce(Option<&mut PgConnection>) -> Result<T>,
    ) -> Result<T> {
        #[cfg(feature = "testing")]
        if self.memory().is_some() {
            return f(None).await;
        }
        let mut conn = self.pool().acquire().await?;
        f(Some(&mut *conn)).await
    }

    /// Creates the outbox table (and the dead-letter table, if configured) where
    /// missing. Idempotent.
    pub async fn migrate(&self) -> Result<()> {
        self.inner.table.migrate(&self.inner.pool).await?;
        if let Some(dlq) = &self.inner.dlq {
            dlq.migrate(&self.inner.pool).await?;
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
    /// from a startup hook or a health check.
    pub async fn validate_schema(&self) -> Result<()> {
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
            &self.inner.pool,
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
    /// Returns `None` only for timer no-ops (see [`publish_with`](Self::publish_with)).
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        body: &T,
        queue: &str,
        conn: &mut PgConnection,
    ) -> Result<Option<i64>> {
        self.publish_with(body, queue, &PublishOptions::default(), conn)
            .await
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
            Ok(id) => crate::telemetry::published(queue, "success", u64::from(id.is_some())),
            Err(_) => crate::telemetry::published(queue, "error", 1),
        }
        res
    }

    async fn execute_insert(
        &self,
        insert: Insert,
        conn: Option<&mut PgConnection>,
    ) -> Result<Option<i64>> {
        #[cfg(feature = "testing")]
        if let Some(h) = self.harness()
            && let Some(store) = h.store()
        {
            let queue = insert.queue.clone();
            let id = store.insert(insert);
            h.inserted(&queue, id.is_some());
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
            Ok(n) => crate::telemetry::published(queue, "success", *n),
            Err(_) => crate::telemetry::published(queue, "error", 1),
        }
        res
    }

    async fn execute_batch(
        &self,
        batch: BatchInsert,
        conn: Option<&mut PgConnection>,
    ) -> Result<u64> {
        #[cfg(feature = "testing")]
        if let Some(h) = self.harness()
            && let Some(store) = h.store()
        {
            let queue = batch.queue.clone();
            let n = store.insert_batch(batch);
            h.inserted(&queue, n > 0);
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
        #[cfg(feature = "testing")]
        if let Some(store) = self.memory() {
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
        #[cfg(feature = "testing")]
        if let Some(store) = self.memory() {
            return Ok(store.fetch_unprocessed(queue, limit));
        }
        producer::fetch_unprocessed_pg(self.stmts(), queue, limit, require(conn)?).await
    }
}

/// The connection a PostgreSQL statement runs on; only the in-memory backend
/// runs without one.
fn require(conn: Option<&mut PgConnection>) -> Result<&mut PgConnection> {
    conn.ok_or_else(|| {
        crate::error::Error::config("this outbox has no in-memory backend; pass a connection")
    })
}
