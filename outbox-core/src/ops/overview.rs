//! The operator overview, for dashboards: per-queue counts that stay cheap on
//! tables of millions of rows ([`OutboxBroker::overview`]), the outbox
//! table's cumulative activity ([`OutboxBroker::table_activity`]), the relay
//! connections ([`OutboxBroker::connections`]) and row lookups by id or
//! correlation id ([`OutboxBroker::find_rows`]). The statements are the
//! storage layer's (`store::overview`).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};

use crate::broker::OutboxBroker;
use crate::envelope::{self, Headers};
use crate::error::{Error, Result};
use crate::publish::validate_queue;
use crate::store::overview::{self as sql, Category, Match};

/// The default [`OverviewOptions::cap`]: counts are exact up to 10,000 rows.
pub const DEFAULT_OVERVIEW_CAP: u64 = 10_000;

/// How many leading payload bytes [`OutboxBroker::find_rows`] returns per row
/// (16 KiB); [`RowView::payload_truncated`] tells when there was more.
pub const ROW_PAYLOAD_LIMIT: usize = 16 * 1024;

/// The most rows [`OutboxBroker::find_rows`] returns from each table.
pub const FIND_ROWS_LIMIT: usize = 100;

/// What [`OutboxBroker::overview`] counts and lists.
///
/// ```
/// use outbox_core::ops::OverviewOptions;
///
/// let opts = OverviewOptions::new().cap(1_000).queues(["orders", "emails"]);
/// assert_eq!(opts.get_cap(), 1_000);
/// assert_eq!(opts.get_queues(), ["orders", "emails"]);
/// assert_eq!(OverviewOptions::default().get_cap(), 10_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverviewOptions {
    cap: u64,
    queues: Vec<String>,
}

impl Default for OverviewOptions {
    fn default() -> Self {
        Self {
            cap: DEFAULT_OVERVIEW_CAP,
            queues: Vec::new(),
        }
    }
}

impl OverviewOptions {
    /// The defaults: a cap of [`DEFAULT_OVERVIEW_CAP`], no extra queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts are exact up to `n` rows per queue and category; above, they
    /// are [`Count::AtLeast`]. The work of one overview grows with the cap
    /// (each count reads at most `n + 1` index entries), not with the table.
    /// Must be at least 1.
    pub fn cap(mut self, n: u64) -> Self {
        self.cap = n;
        self
    }

    /// Queues listed even when neither table has a row of them (the queues
    /// the application subscribes to, so that an empty queue still shows).
    /// Added to the ones set before.
    pub fn queues(mut self, q: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.queues.extend(q.into_iter().map(Into::into));
        self
    }

    /// The cap.
    pub fn get_cap(&self) -> u64 {
        self.cap
    }

    /// The queues always listed.
    pub fn get_queues(&self) -> &[String] {
        &self.queues
    }

    fn validate(&self) -> Result<i64> {
        if self.cap == 0 {
            return Err(Error::arg(
                "the overview cap must be >= 1 (counts are exact up to the cap), got 0",
            ));
        }
        for q in &self.queues {
            validate_queue(q)?;
        }
        i64::try_from(self.cap)
            .ok()
            .and_then(|c| c.checked_add(1))
            .ok_or_else(|| {
                Error::arg(format!(
                    "the overview cap must be below {}, got {}",
                    i64::MAX,
                    self.cap
                ))
            })
    }
}

/// A row count of the overview: exact up to the cap, else a lower bound with
/// the planner's estimate.
///
/// `Display` renders `1,234`, `10,000+ (≈171,000)`, `10,000+` (no usable
/// estimate) and `unknown`.
///
/// ```
/// use outbox_core::ops::Count;
///
/// assert_eq!(Count::Exact(1234).to_string(), "1,234");
/// let big = Count::AtLeast { cap: 10_000, estimate: Some(171_000) };
/// assert_eq!(big.to_string(), "10,000+ (≈171,000)");
/// assert_eq!(big.lower_bound(), Some(10_001));
/// assert_eq!(Count::Unknown.to_string(), "unknown");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Count {
    /// Exactly this many rows (at most the cap).
    Exact(u64),
    /// More than `cap` rows. `estimate` is the planner's estimate of the
    /// whole count (from the table statistics, as fresh as the last
    /// `ANALYZE`); `None` when the planner's figure was not above the cap,
    /// which the count proved wrong.
    AtLeast {
        /// The cap that was reached.
        cap: u64,
        /// The planner's estimate, if above the cap.
        estimate: Option<u64>,
    },
    /// Not counted: the index this count needs is missing (see
    /// [`QueueOverview::retrying`]).
    Unknown,
}

impl Count {
    /// The least number of rows there are: the count, or `cap + 1`; `None`
    /// when unknown.
    pub fn lower_bound(&self) -> Option<u64> {
        match *self {
            Count::Exact(n) => Some(n),
            Count::AtLeast { cap, .. } => Some(cap.saturating_add(1)),
            Count::Unknown => None,
        }
    }

    /// Whether the count is exact.
    pub fn is_exact(&self) -> bool {
        matches!(self, Count::Exact(_))
    }
}

/// `1234567` -> `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Count::Exact(n) => f.write_str(&grouped(n)),
            Count::AtLeast {
                cap,
                estimate: Some(e),
            } => write!(f, "{}+ (≈{})", grouped(cap), grouped(e)),
            Count::AtLeast {
                cap,
                estimate: None,
            } => write!(f, "{}+", grouped(cap)),
            Count::Unknown => f.write_str("unknown"),
        }
    }
}

/// One queue of [`OutboxBroker::overview`]. Times are measured on the
/// database clock.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOverview {
    /// The queue name.
    pub queue: String,
    /// Unleased rows that are due (`next_attempt_at <= now()`): claimable now.
    pub ready: Count,
    /// Unleased rows that are not due yet (delayed publishes, retries
    /// waiting for their back-off).
    pub scheduled: Count,
    /// Rows under a lease (being handled, or held by a relay that died and
    /// whose lease has not expired yet).
    pub leased: Count,
    /// Unleased rows that have had at least one attempt
    /// (`attempts_count > 0`): retries, ready or scheduled (a subset of
    /// `ready + scheduled`, not a separate state).
    ///
    /// Counted on the optional partial index `<table>_retry_idx` (`(queue,
    /// next_attempt_at) WHERE attempts_count > 0 AND acquired_token IS
    /// NULL`), which [`OutboxTable::migrate`](crate::OutboxTable::migrate)
    /// creates. Nothing else can count these rows without reading every
    /// unleased row of the queue, so on a table that lacks the index (one
    /// created by faststream-outbox, or with your own DDL before it
    /// existed) this is [`Count::Unknown`]; schema validation does not
    /// require the index. On a large live table, create it without blocking
    /// writes: `CREATE INDEX CONCURRENTLY "<table>_retry_idx" ON <table>
    /// (queue, next_attempt_at) WHERE attempts_count > 0 AND acquired_token
    /// IS NULL`.
    pub retrying: Count,
    /// Rows of this queue in the dead-letter table (`Exact(0)` without one).
    pub dead_letters: Count,
    /// How long the oldest ready row has been due (the relay lag): the first
    /// entry of `<table>_pending_idx`. `None` when nothing is ready.
    pub oldest_ready_age: Option<Duration>,
    /// How long ago the oldest current lease was taken or last extended by
    /// the heartbeat (`now() - acquired_at`): a lease far older than the
    /// subscriber's `lease_ttl` belongs to a relay that died. Exact when the
    /// queue has at most `cap` leased rows, else the oldest among the
    /// `cap + 1` leased rows due first. `None` when nothing is leased.
    pub oldest_lease_age: Option<Duration>,
}

impl QueueOverview {
    fn count_mut(&mut self, cat: Category) -> &mut Count {
        match cat {
            Category::Ready => &mut self.ready,
            Category::Scheduled => &mut self.scheduled,
            Category::Leased => &mut self.leased,
            Category::Retrying => &mut self.retrying,
            Category::DeadLetters => &mut self.dead_letters,
        }
    }

    fn empty(queue: String) -> Self {
        Self {
            queue,
            ready: Count::Exact(0),
            scheduled: Count::Exact(0),
            leased: Count::Exact(0),
            retrying: Count::Exact(0),
            dead_letters: Count::Exact(0),
            oldest_ready_age: None,
            oldest_lease_age: None,
        }
    }
}

/// The outbox table's cumulative activity, from PostgreSQL's statistics
/// (what `pg_stat_user_tables` shows): sample it periodically and divide
/// the differences by the time between `sampled_at`s for insert and delete
/// rates (a relay deletes each row it delivers).
///
/// The counters are cumulative since the last statistics reset and are
/// flushed by each backend at most once a second (PostgreSQL 15+), so a
/// sample lags the truth by about a second. `live_rows`/`dead_rows` are
/// estimates maintained by the same statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableActivity {
    /// Rows inserted (`n_tup_ins`).
    pub inserted: u64,
    /// Rows updated (`n_tup_upd`): claims, retries, heartbeats.
    pub updated: u64,
    /// Rows deleted (`n_tup_del`): acknowledged deliveries and moves to the
    /// dead-letter table.
    pub deleted: u64,
    /// Estimated live rows (`n_live_tup`).
    pub live_rows: u64,
    /// Estimated dead rows awaiting vacuum (`n_dead_tup`).
    pub dead_rows: u64,
    /// The last autovacuum of the table, if any since the statistics reset.
    pub last_autovacuum: Option<DateTime<Utc>>,
    /// The last manual `VACUUM`, if any.
    pub last_vacuum: Option<DateTime<Utc>>,
    /// The last autoanalyze, if any.
    pub last_autoanalyze: Option<DateTime<Utc>>,
    /// When the sample was read (database clock).
    pub sampled_at: DateTime<Utc>,
}

/// A database connection that looks like a relay of the outbox table, from
/// `pg_stat_activity`; see [`OutboxBroker::connections`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayConnection {
    /// The backend's process id.
    pub pid: i32,
    /// Its `application_name` (an engine's are `<prefix>-fetch`, `-worker`,
    /// `-listen`, `-acker`; see
    /// [`Engine::application_name`](crate::Engine::application_name)).
    pub application_name: String,
    /// `fetch`, `worker`, `listen` or `acker` for an engine connection
    /// (from the `application_name` suffix); `None` for another backend
    /// (such as a faststream-outbox relay) found by its statement.
    pub role: Option<String>,
    /// The client's address; `None` over a Unix socket.
    pub client_addr: Option<String>,
    /// When the connection was opened.
    pub backend_start: Option<DateTime<Utc>>,
    /// `active`, `idle`, `idle in transaction`, ...
    pub state: Option<String>,
    /// The wait event type, if waiting (`Client`, `Lock`, `IO`, ...).
    pub wait_event_type: Option<String>,
    /// The wait event, if waiting (`ClientRead`, ...).
    pub wait_event: Option<String>,
    /// The current statement, or the last one when idle (for a LISTEN
    /// connection: its `LISTEN "<channel>"`).
    pub query: String,
    /// When the current or last statement started.
    pub query_start: Option<DateTime<Utc>>,
    /// When `state` last changed.
    pub state_change: Option<DateTime<Utc>>,
    /// Whether the connection's last statement was a `LISTEN`.
    pub is_listen: bool,
    /// The channel of that `LISTEN` (unquoted), if any.
    pub listen_channel: Option<String>,
}

/// Which rows [`OutboxBroker::find_rows`] looks up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RowLookup {
    /// The outbox row with this id, and the dead letters whose
    /// `original_id` it is.
    Id(i64),
    /// The dead letter with this id (the dead-letter table's own `id`).
    DeadLetterId(i64),
    /// Rows of both tables whose `correlation_id` header is this. No index
    /// covers headers: this reads both tables sequentially (stopping after
    /// [`FIND_ROWS_LIMIT`] matches), so it costs a full scan on a large
    /// table.
    CorrelationId(String),
}

/// Where a row of [`OutboxBroker::find_rows`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RowState {
    /// In the outbox, unleased and due.
    Ready,
    /// In the outbox, unleased, due later.
    Scheduled,
    /// In the outbox, leased (being handled, or its lease has not expired).
    Leased,
    /// In the dead-letter table.
    DeadLetter,
}

impl RowState {
    /// `ready`, `scheduled`, `leased`, `dead_letter`.
    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Ready => "ready",
            RowState::Scheduled => "scheduled",
            RowState::Leased => "leased",
            RowState::DeadLetter => "dead_letter",
        }
    }
}

impl fmt::Display for RowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row found by [`OutboxBroker::find_rows`]: an outbox row or a dead
/// letter, with the first [`ROW_PAYLOAD_LIMIT`] bytes of its payload.
/// Fields that only one of the tables has are `None` for the other.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RowView {
    /// Where the row is; [`RowState::DeadLetter`] for the dead-letter table.
    pub state: RowState,
    /// The row's id in its table.
    pub id: i64,
    /// A dead letter's id in the outbox (`original_id`); `None` for an
    /// outbox row.
    pub original_id: Option<i64>,
    /// The queue.
    pub queue: String,
    /// The `correlation_id` header, else the (outbox) row id.
    pub correlation_id: String,
    /// The headers.
    pub headers: Headers,
    /// The payload's first [`ROW_PAYLOAD_LIMIT`] bytes.
    pub payload: Vec<u8>,
    /// The payload's full length in bytes.
    pub payload_len: u64,
    /// Whether `payload` is shorter than the stored payload.
    pub payload_truncated: bool,
    /// Recorded handler outcomes (outbox rows only).
    pub attempts_count: Option<i64>,
    /// Claims so far (for a dead letter: before it failed).
    pub deliveries_count: i64,
    /// When the row was inserted into the outbox.
    pub created_at: DateTime<Utc>,
    /// When it may next be claimed (outbox rows only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The first recorded attempt (outbox rows only).
    pub first_attempt_at: Option<DateTime<Utc>>,
    /// The latest recorded attempt (outbox rows only).
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// When the current lease was taken or extended (leased rows only).
    pub acquired_at: Option<DateTime<Utc>>,
    /// When it was moved to the dead-letter table (dead letters only).
    pub failed_at: Option<DateTime<Utc>>,
    /// Why (dead letters only): `max_deliveries`, `retry_terminal`,
    /// `rejected`, or another writer's text.
    pub failure_reason: Option<String>,
    /// The rendered last error (dead letters only, if recorded).
    pub last_exception: Option<String>,
    /// The timer id, if any.
    pub timer_id: Option<String>,
    /// The ordering key, if any.
    pub ordering_key: Option<String>,
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn age(secs: Option<f64>) -> Option<Duration> {
    secs.and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok())
}

/// The planner's row estimates of the `n` branches of an `EXPLAIN (FORMAT
/// JSON)` of a `UNION ALL` (see `store::overview::estimates_sql`): the
/// `Append`'s children in order, or the plan itself for one branch. `None`
/// when the plan does not have that shape.
fn branch_rows(plan: &serde_json::Value, n: usize) -> Option<Vec<f64>> {
    let top = plan.get(0)?.get("Plan")?;
    let rows = |node: &serde_json::Value| node.get("Plan Rows")?.as_f64();
    if n == 1 {
        return Some(vec![rows(top)?]);
    }
    if top.get("Node Type")?.as_str()? != "Append" {
        return None;
    }
    let children = top.get("Plans")?.as_array()?;
    if children.len() != n {
        return None;
    }
    children.iter().map(rows).collect()
}

/// What statement 1 of the overview found.
struct Listing {
    queues: Vec<String>,
    retry_index: bool,
}

impl OutboxBroker {
    /// Every queue of the outbox and dead-letter tables (plus
    /// [`OverviewOptions::queues`], even when empty) with its counts, sorted
    /// by name: ready, scheduled, leased, retrying, dead letters, the age of
    /// the oldest ready row and of the oldest lease. Made for dashboards
    /// that refresh every few seconds on tables of millions of rows.
    ///
    /// Nothing reads a whole table: the queues are listed with a loose
    /// index scan (one index descent per distinct queue, over
    /// `<table>_key_idx` and the dead-letter `(queue, failed_at)` index);
    /// each count reads at most `cap + 1` entries of a partial index
    /// (index-only scans of `<table>_pending_idx`, `<table>_leased_idx`,
    /// `<table>_retry_idx`); above the cap, a count is
    /// [`Count::AtLeast`] with the planner's estimate (one `EXPLAIN` of
    /// all the counts over the cap, nothing executed). No statement of it
    /// uses a sequential scan. On 1,000,000 rows in 4 queues it took 17 ms
    /// (p50; 6 ms with a cap of 1,000) where the exact
    /// [`stats`](OutboxBroker::stats) took 178 ms (docs/performance.md).
    ///
    /// One read transaction, two statements (list the queues and check the
    /// optional retry index; count per queue, one row each), plus one
    /// `EXPLAIN` when any count is over the cap. JIT is turned off inside the
    /// transaction: its compile time would exceed the query's.
    ///
    /// See [`QueueOverview::retrying`] for the optional index it needs
    /// (else `retrying` is [`Count::Unknown`]). On the in-memory store,
    /// [`Error::Unsupported`].
    ///
    /// ```no_run
    /// use outbox_core::ops::OverviewOptions;
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// for q in outbox.overview(&OverviewOptions::new().queues(["orders"])).await? {
    ///     println!("{:<20} ready={} scheduled={} leased={} retrying={} dead={}",
    ///         q.queue, q.ready, q.scheduled, q.leased, q.retrying, q.dead_letters);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn overview(&self, opts: &OverviewOptions) -> Result<Vec<QueueOverview>> {
        let cap1 = opts.validate()?;
        let pool = self.ops_pool("overview")?;
        let mut tx = pool.begin().await?;
        let listing = self.overview_listing(&mut tx, opts).await?;
        let counts = sql::counts_sql(self.table(), self.dlq(), listing.retry_index);
        let rows = sqlx::query(sqlx::AssertSqlSafe(counts))
            .bind(&listing.queues)
            .bind(cap1)
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        // The counts over the cap: (queue index, category), estimated at once.
        let mut over: Vec<(usize, Category)> = Vec::new();
        for row in rows {
            let mut q = QueueOverview::empty(row.try_get(0)?);
            let cats = [
                (Category::Ready, 1),
                (Category::Scheduled, 2),
                (Category::Leased, 3),
                (Category::Retrying, 4),
                (Category::DeadLetters, 5),
            ];
            for (cat, col) in cats {
                let n: Option<i64> = row.try_get(col)?;
                let count = match n {
                    None if cat == Category::Retrying => Count::Unknown,
                    None => Count::Exact(0),
                    Some(n) if to_u64(n) > opts.cap => {
                        over.push((out.len(), cat));
                        Count::AtLeast {
                            cap: opts.cap,
                            estimate: None,
                        }
                    }
                    Some(n) => Count::Exact(to_u64(n)),
                };
                *q.count_mut(cat) = count;
            }
            q.oldest_ready_age = age(row.try_get(6)?);
            q.oldest_lease_age = age(row.try_get(7)?);
            out.push(q);
        }
        if !over.is_empty() {
            let estimates = self.estimates(&mut tx, &out, &over).await?;
            for (&(i, cat), e) in over.iter().zip(estimates) {
                if let Some(q) = out.get_mut(i) {
                    *q.count_mut(cat) = Count::AtLeast {
                        cap: opts.cap,
                        estimate: e.filter(|r| *r > opts.cap),
                    };
                }
            }
        }
        tx.commit().await?;
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(out)
    }

    /// Statement 1: the queues to count (both tables' and the configured
    /// ones, deduplicated and sorted) and whether the retry index exists.
    async fn overview_listing(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        opts: &OverviewOptions,
    ) -> Result<Listing> {
        let stmt = sql::queues_sql(self.table(), self.dlq());
        let row = sqlx::query(sqlx::AssertSqlSafe(stmt))
            .bind(sql::retry_index_name(self.table()))
            .fetch_one(&mut **tx)
            .await?;
        let mut queues: Vec<String> = row.try_get(0)?;
        queues.extend(row.try_get::<Vec<String>, _>(1)?);
        queues.extend(opts.queues.iter().cloned());
        queues.sort();
        queues.dedup();
        let def: Option<String> = row.try_get(2)?;
        Ok(Listing {
            queues,
            retry_index: def.is_some_and(|d| sql::retry_index_matches(&d)),
        })
    }

    /// The planner's estimates of the counts `over` (indexes into `queues`
    /// and categories), in order: one `EXPLAIN` of them all. `None` for
    /// each when the plan has an unexpected shape.
    async fn estimates(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        queues: &[QueueOverview],
        over: &[(usize, Category)],
    ) -> Result<Vec<Option<u64>>> {
        let cats: Vec<Category> = over.iter().map(|&(_, c)| c).collect();
        let stmt = sql::estimates_sql(self.table(), self.dlq(), &cats);
        let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(stmt));
        for &(i, _) in over {
            q = q.bind(queues.get(i).map_or("", |q| q.queue.as_str()));
        }
        let plan: serde_json::Value = q.fetch_one(&mut **tx).await?;
        Ok(match branch_rows(&plan, over.len()) {
            Some(rows) => rows
                .into_iter()
                .map(|r| (r.is_finite() && r >= 0.0).then(|| r.round() as u64))
                .collect(),
            None => vec![None; over.len()],
        })
    }

    /// The plans of the statements [`overview`](Self::overview) runs, for
    /// the tests that check they use no sequential scan: `(sql, EXPLAIN
    /// output)` of statement 1 and statement 2 with the parameters the
    /// overview binds. The estimates' `EXPLAIN` is not included (it
    /// executes nothing). Not a stable API.
    #[doc(hidden)]
    pub async fn overview_plans(&self, opts: &OverviewOptions) -> Result<Vec<(String, String)>> {
        let cap1 = opts.validate()?;
        let pool = self.ops_pool("overview")?;
        let mut tx = pool.begin().await?;
        let listing = self.overview_listing(&mut tx, opts).await?;
        let first = sql::queues_sql(self.table(), self.dlq());
        let lines: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {first}")))
                .bind(sql::retry_index_name(self.table()))
                .fetch_all(&mut *tx)
                .await?;
        let mut out = vec![(first, lines.join("\n"))];
        let second = sql::counts_sql(self.table(), self.dlq(), listing.retry_index);
        let lines: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {second}")))
                .bind(&listing.queues)
                .bind(cap1)
                .fetch_all(&mut *tx)
                .await?;
        out.push((second, lines.join("\n")));
        tx.commit().await?;
        Ok(out)
    }

    /// The outbox table's cumulative statistics (inserted, updated and
    /// deleted rows, live and dead row estimates, last vacuums): one
    /// statement of function calls, no table read. Errors with
    /// [`Error::InvalidConfig`] when the table does not exist.
    ///
    /// ```no_run
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let a = outbox.table_activity().await?;
    /// tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    /// let b = outbox.table_activity().await?;
    /// let secs = (b.sampled_at - a.sampled_at).as_seconds_f64();
    /// println!("{:.0} rows/s relayed", (b.deleted - a.deleted) as f64 / secs);
    /// # Ok(()) }
    /// ```
    pub async fn table_activity(&self) -> Result<TableActivity> {
        let pool = self.ops_pool("table_activity")?;
        let row = sqlx::query(sql::ACTIVITY_SQL)
            .bind(self.table().qualified_name())
            .fetch_one(pool)
            .await?;
        if !row.try_get::<bool, _>(0)? {
            return Err(Error::config(format!(
                "the outbox table {} does not exist: create it with OutboxBroker::migrate \
                 (CLI: outbox migrate)",
                self.table().qualified_name()
            )));
        }
        Ok(TableActivity {
            inserted: to_u64(row.try_get(1)?),
            updated: to_u64(row.try_get(2)?),
            deleted: to_u64(row.try_get(3)?),
            live_rows: to_u64(row.try_get(4)?),
            dead_rows: to_u64(row.try_get(5)?),
            last_autovacuum: row.try_get(6)?,
            last_vacuum: row.try_get(7)?,
            last_autoanalyze: row.try_get(8)?,
            sampled_at: row.try_get(9)?,
        })
    }

    /// The connections of this database that look like relays of the outbox
    /// table, from `pg_stat_activity`: every engine connection (its
    /// `application_name` ends in `-fetch`, `-worker`, `-listen` or
    /// `-acker`: any engine on this database, whatever its table), and any
    /// other backend whose current or last statement names the table (how a
    /// faststream-outbox relay, which sets no `application_name`, shows up,
    /// by its claims and its `LISTEN`). The caller's own connection is
    /// left out. Sorted by `application_name`, then pid.
    ///
    /// `query` is visible for other roles' backends only to superusers and
    /// members of `pg_read_all_stats`; otherwise PostgreSQL shows
    /// `<insufficient privilege>` and such a relay is found by name only.
    pub async fn connections(&self) -> Result<Vec<RelayConnection>> {
        let pool = self.ops_pool("connections")?;
        let rows = sqlx::query(sql::CONNECTIONS_SQL)
            .bind(self.table().name())
            .fetch_all(pool)
            .await?;
        rows.iter().map(relay_connection).collect()
    }

    /// The rows `lookup` names in the outbox and dead-letter tables, outbox
    /// rows first, each table's in id order (at most [`FIND_ROWS_LIMIT`]
    /// each), with the first [`ROW_PAYLOAD_LIMIT`] bytes of each payload.
    /// Without a dead-letter table, only the outbox is searched. An id or
    /// dead-letter id lookup uses the primary key (the dead letters of an
    /// outbox id are found by `original_id`, which has no index: a scan of
    /// the dead-letter table); see [`RowLookup::CorrelationId`] for its cost.
    ///
    /// ```no_run
    /// use outbox_core::ops::RowLookup;
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// for r in outbox.find_rows(&RowLookup::CorrelationId("c-42".into())).await? {
    ///     println!("{} {} in {}: {} bytes", r.state, r.id, r.queue, r.payload_len);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn find_rows(&self, lookup: &RowLookup) -> Result<Vec<RowView>> {
        let pool = self.ops_pool("find_rows")?;
        let (m, id, text) = match lookup {
            RowLookup::Id(id) => (Match::Id, *id, None),
            RowLookup::DeadLetterId(id) => (Match::DeadLetterId, *id, None),
            RowLookup::CorrelationId(c) => {
                if c.is_empty() {
                    return Err(Error::arg(
                        "the correlation id to look up must not be empty",
                    ));
                }
                (Match::CorrelationId, 0, Some(c.clone()))
            }
        };
        let payload_limit = i32::try_from(ROW_PAYLOAD_LIMIT).unwrap_or(i32::MAX);
        let limit = i64::try_from(FIND_ROWS_LIMIT).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        if let Some(stmt) = sql::find_outbox_sql(self.table(), m) {
            let q = sqlx::query(sqlx::AssertSqlSafe(stmt));
            let q = match &text {
                Some(t) => q.bind(t.clone()),
                None => q.bind(id),
            };
            for row in q.bind(payload_limit).bind(limit).fetch_all(pool).await? {
                out.push(outbox_view(&row)?);
            }
        }
        if let Some(dlq) = self.dlq() {
            let q = sqlx::query(sqlx::AssertSqlSafe(sql::find_dlq_sql(dlq, m)));
            let q = match &text {
                Some(t) => q.bind(t.clone()),
                None => q.bind(id),
            };
            for row in q.bind(payload_limit).bind(limit).fetch_all(pool).await? {
                out.push(dead_letter_view(&row)?);
            }
        }
        Ok(out)
    }
}

fn relay_connection(r: &PgRow) -> Result<RelayConnection> {
    let application_name: String = r.try_get(1)?;
    let query: String = r.try_get(7)?;
    let role = application_name
        .rsplit_once('-')
        .map(|(_, s)| s)
        .filter(|s| matches!(*s, "fetch" | "worker" | "listen" | "acker"))
        .map(str::to_owned);
    let listen_channel = listen_channel(&query);
    Ok(RelayConnection {
        pid: r.try_get(0)?,
        application_name,
        role,
        client_addr: r.try_get(2)?,
        backend_start: r.try_get(3)?,
        state: r.try_get(4)?,
        wait_event_type: r.try_get(5)?,
        wait_event: r.try_get(6)?,
        is_listen: listen_channel.is_some(),
        listen_channel,
        query,
        query_start: r.try_get(8)?,
        state_change: r.try_get(9)?,
    })
}

/// The channel of a `LISTEN` statement (`LISTEN "outbox_x"`, `listen x;`).
fn listen_channel(query: &str) -> Option<String> {
    let q = query.trim_start();
    let head = q.get(..6)?;
    if !head.eq_ignore_ascii_case("listen") {
        return None;
    }
    let rest = q[6..].trim().trim_end_matches(';').trim();
    if rest.is_empty() || !q[6..].starts_with(char::is_whitespace) {
        return None;
    }
    Some(match rest.strip_prefix('"') {
        Some(inner) => inner.trim_end_matches('"').replace("\"\"", "\""),
        None => rest.to_ascii_lowercase(),
    })
}

fn truncated(payload: Vec<u8>, len: i64) -> (Vec<u8>, u64, bool) {
    let len = to_u64(len);
    let cut = (payload.len() as u64) < len;
    (payload, len, cut)
}

fn outbox_view(r: &PgRow) -> Result<RowView> {
    let id: i64 = r.try_get("id")?;
    let headers = envelope::headers_column(r.try_get("headers")?, "outbox row", id);
    let acquired_at: Option<DateTime<Utc>> = r.try_get("acquired_at")?;
    let due: bool = r.try_get("due")?;
    let state = match (acquired_at.is_some(), due) {
        (true, _) => RowState::Leased,
        (false, true) => RowState::Ready,
        (false, false) => RowState::Scheduled,
    };
    let (payload, payload_len, payload_truncated) =
        truncated(r.try_get("payload")?, r.try_get("payload_len")?);
    Ok(RowView {
        state,
        id,
        original_id: None,
        queue: r.try_get("queue")?,
        correlation_id: envelope::correlation_id_or(&headers, id),
        headers,
        payload,
        payload_len,
        payload_truncated,
        attempts_count: Some(r.try_get("attempts_count")?),
        deliveries_count: r.try_get("deliveries_count")?,
        created_at: r.try_get("created_at")?,
        next_attempt_at: Some(r.try_get("next_attempt_at")?),
        first_attempt_at: r.try_get("first_attempt_at")?,
        last_attempt_at: r.try_get("last_attempt_at")?,
        acquired_at,
        failed_at: None,
        failure_reason: None,
        last_exception: None,
        timer_id: r.try_get("timer_id")?,
        ordering_key: r.try_get("ordering_key")?,
    })
}

fn dead_letter_view(r: &PgRow) -> Result<RowView> {
    let id: i64 = r.try_get("id")?;
    let original_id: i64 = r.try_get("original_id")?;
    let headers = envelope::headers_column(r.try_get("headers")?, "dead letter", id);
    let (payload, payload_len, payload_truncated) =
        truncated(r.try_get("payload")?, r.try_get("payload_len")?);
    Ok(RowView {
        state: RowState::DeadLetter,
        id,
        original_id: Some(original_id),
        queue: r.try_get("queue")?,
        correlation_id: envelope::correlation_id_or(&headers, original_id),
        headers,
        payload,
        payload_len,
        payload_truncated,
        attempts_count: None,
        deliveries_count: r.try_get("deliveries_count")?,
        created_at: r.try_get("created_at")?,
        next_attempt_at: None,
        first_attempt_at: None,
        last_attempt_at: None,
        acquired_at: None,
        failed_at: Some(r.try_get("failed_at")?),
        failure_reason: Some(r.try_get("failure_reason")?),
        last_exception: r.try_get("last_exception")?,
        timer_id: r.try_get("timer_id")?,
        ordering_key: r.try_get("ordering_key")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_with_separators_and_estimates() {
        assert_eq!(Count::Exact(0).to_string(), "0");
        assert_eq!(Count::Exact(999).to_string(), "999");
        assert_eq!(Count::Exact(1_000).to_string(), "1,000");
        assert_eq!(Count::Exact(1_234_567).to_string(), "1,234,567");
        let c = Count::AtLeast {
            cap: 10_000,
            estimate: None,
        };
        assert_eq!(c.to_string(), "10,000+");
        assert_eq!(Count::Unknown.lower_bound(), None);
    }

    #[test]
    fn listen_statements_name_their_channel() {
        assert_eq!(
            listen_channel(r#"LISTEN "outbox_ob""#).as_deref(),
            Some("outbox_ob")
        );
        assert_eq!(
            listen_channel("listen Outbox_X;").as_deref(),
            Some("outbox_x")
        );
        assert_eq!(listen_channel("LISTENING"), None);
        assert_eq!(listen_channel("SELECT 1"), None);
        assert_eq!(listen_channel("LISTEN"), None);
    }

    #[test]
    fn options_are_validated() {
        assert!(OverviewOptions::new().cap(0).validate().is_err());
        assert!(OverviewOptions::new().cap(u64::MAX).validate().is_err());
        assert!(OverviewOptions::new().queues([""]).validate().is_err());
        assert_eq!(OverviewOptions::new().cap(5).validate().ok(), Some(6));
    }

    #[test]
    fn branch_estimates_are_read_from_explain_json() {
        let one =
            serde_json::json!([{"Plan": {"Node Type": "Index Only Scan", "Plan Rows": 171000}}]);
        assert_eq!(branch_rows(&one, 1), Some(vec![171_000.0]));
        let two = serde_json::json!([{"Plan": {"Node Type": "Append", "Plan Rows": 5, "Plans": [
            {"Node Type": "Index Only Scan", "Plan Rows": 3},
            {"Node Type": "Index Scan", "Plan Rows": 2.0}
        ]}}]);
        assert_eq!(branch_rows(&two, 2), Some(vec![3.0, 2.0]));
        // Another shape than one child per branch: no estimates.
        assert_eq!(branch_rows(&two, 3), None);
        assert_eq!(branch_rows(&one, 2), None);
        assert_eq!(branch_rows(&serde_json::json!([]), 1), None);
    }
}
