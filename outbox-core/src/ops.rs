//! Operations: queue statistics, dead-letter inspection, replay and purge,
//! autovacuum tuning. The `outbox` command-line tool is built on these.
//!
//! Everything here runs on the broker's pool (never on a caller's
//! transaction), reads only through the validated table definitions, and binds
//! every value as a parameter.
//!
//! ```no_run
//! use outbox_core::ops::{DlqFilter, ReplayOptions};
//! use outbox_core::{DlqTable, OutboxBroker, OutboxTable};
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), outbox_core::Error> {
//! let outbox = OutboxBroker::new(pool, OutboxTable::new("outbox")?)
//!     .dead_letter_table(DlqTable::new("outbox_dlq")?);
//!
//! for q in outbox.stats().await? {
//!     println!("{}: {} ready, {} leased, {} dead", q.queue, q.ready, q.leased, q.dead_letters);
//! }
//! // Put the rejected `orders` rows of the last hour back into the outbox.
//! let since = chrono::Utc::now() - chrono::Duration::hours(1);
//! let filter = DlqFilter::new().queue("orders").reason("rejected").since(since);
//! let report = outbox.dlq_replay(&filter).await?;
//! println!("{} replayed, {} skipped", report.replayed.len(), report.skipped.len());
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgArguments, PgRow};

use crate::broker::OutboxBroker;
use crate::envelope::CORRELATION_ID;
use crate::error::{Error, Result};
use crate::publish::validate_queue;
use crate::store::DlqTable;
use crate::store::dead_letter::DLQ_SELECT;
pub use crate::store::{AutovacuumOptions, DeadLetter, QueueStats, autovacuum_sql};

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The header a replayed row carries: the `original_id` of the dead letter it
/// was replayed from (the id the row had in the outbox before it failed).
pub const REPLAYED_FROM_HEADER: &str = "x-outbox-replayed-from";

/// Default number of dead letters moved per statement by a replay.
pub const DEFAULT_REPLAY_BATCH_SIZE: u64 = 500;

/// Longest `failure_reason` (the column is `VARCHAR(64)`).
const MAX_REASON_CHARS: usize = 64;

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

impl OutboxBroker {
    /// Counts every queue present in the outbox or the dead-letter table:
    /// ready, leased and scheduled rows, the age of the oldest ready row (the
    /// relay lag) and the dead letters. Sorted by queue name.
    ///
    /// Two statements (one per table), each using the tables' indexes; the
    /// counts are exact, so the cost grows with the number of rows (an
    /// index-only scan of the outbox's partial indexes when the visibility
    /// map allows it). Without a dead-letter table, `dead_letters` is 0.
    ///
    /// ```no_run
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// for q in outbox.stats().await? {
    ///     let lag = q.oldest_ready_age.map_or(0.0, |d| d.as_secs_f64());
    ///     println!("{:<20} ready={} leased={} scheduled={} lag={lag:.1}s dlq={}",
    ///         q.queue, q.ready, q.leased, q.scheduled, q.dead_letters);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn stats(&self) -> Result<Vec<QueueStats>> {
        self.queue_stats(None).await
    }

    /// [`stats`](Self::stats) for the given queues only: one entry per
    /// distinct queue, sorted by name, with zeros for a queue that has no rows.
    /// Errors with [`Error::InvalidArgument`] on an empty or over-long name.
    pub async fn stats_for(&self, queues: &[&str]) -> Result<Vec<QueueStats>> {
        self.queue_stats(Some(queues)).await
    }
}

// ---------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------

/// Which dead letters an operation applies to. Criteria combine with AND;
/// matching rows are taken in id order (oldest first), so `list`, `replay`
/// and `purge` with the same filter and limit touch the same rows.
///
/// A filter without any criterion (queue, reason, since, until, ids) matches
/// everything: [`OutboxBroker::dlq_list`] accepts it, but
/// [`dlq_replay`](OutboxBroker::dlq_replay) and
/// [`dlq_purge`](OutboxBroker::dlq_purge) refuse it unless it was built with
/// [`DlqFilter::all`]. A `limit` alone is not a criterion.
///
/// ```
/// use outbox_core::ops::DlqFilter;
///
/// let recent = DlqFilter::new()
///     .queue("orders")
///     .reason("retry_terminal")
///     .since(chrono::Utc::now() - chrono::Duration::hours(24))
///     .limit(100);
/// assert!(!recent.is_unrestricted());
/// assert!(DlqFilter::new().limit(10).is_unrestricted());
/// let three = DlqFilter::new().ids([17, 18, 19]);
/// # let _ = (three, DlqFilter::all());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DlqFilter {
    queue: Option<String>,
    reason: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    ids: Option<Vec<i64>>,
    limit: Option<u64>,
    all: bool,
}

/// One bind parameter of a dynamically assembled statement.
#[derive(Debug, Clone)]
enum Arg {
    Text(String),
    Time(DateTime<Utc>),
    Ids(Vec<i64>),
    Int(i64),
}

/// A `WHERE` clause over the dead-letter table (alias `d`) and its parameters.
#[derive(Debug, Clone)]
struct Clause {
    sql: String,
    args: Vec<Arg>,
}

impl Clause {
    fn push(&mut self, cond: impl FnOnce(usize) -> String, arg: Arg) {
        self.args.push(arg);
        let n = self.args.len();
        self.sql.push_str(" AND ");
        self.sql.push_str(&cond(n));
    }

    /// Appends a parameter that the caller places in the SQL text itself;
    /// returns its `$n`.
    fn param(&mut self, arg: Arg) -> String {
        self.args.push(arg);
        format!("${}", self.args.len())
    }
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, PgArguments>,
    args: &[Arg],
) -> sqlx::query::Query<'q, sqlx::Postgres, PgArguments> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s.clone()),
            Arg::Time(t) => q.bind(*t),
            Arg::Ids(v) => q.bind(v.clone()),
            Arg::Int(n) => q.bind(*n),
        };
    }
    q
}

impl DlqFilter {
    /// No criteria yet (matches every dead letter).
    pub fn new() -> Self {
        Self::default()
    }

    /// Explicitly every dead letter: what [`dlq_replay`](OutboxBroker::dlq_replay)
    /// and [`dlq_purge`](OutboxBroker::dlq_purge) need to run without a
    /// criterion. Criteria added afterwards still narrow it.
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// Only rows of `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Only rows whose `failure_reason` is `reason` (`max_deliveries`,
    /// `retry_terminal`, `rejected`; see [`FailureReason`](crate::FailureReason)).
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Only rows that failed at or after `at` (`failed_at >= at`).
    pub fn since(mut self, at: DateTime<Utc>) -> Self {
        self.since = Some(at);
        self
    }

    /// Only rows that failed before `at` (`failed_at < at`).
    pub fn until(mut self, at: DateTime<Utc>) -> Self {
        self.until = Some(at);
        self
    }

    /// Only these dead-letter ids (the table's `id`, not `original_id`). An
    /// empty list matches nothing.
    pub fn ids(mut self, ids: impl IntoIterator<Item = i64>) -> Self {
        self.ids = Some(ids.into_iter().collect());
        self
    }

    /// At most `n` rows (the oldest by id). Must be at least 1.
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// True when no criterion is set (whatever the limit): such a filter
    /// selects every dead letter.
    pub fn is_unrestricted(&self) -> bool {
        self.queue.is_none()
            && self.reason.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.ids.is_none()
    }

    /// True when built with [`DlqFilter::all`].
    pub fn is_all(&self) -> bool {
        self.all
    }

    /// The limit, if set.
    pub fn get_limit(&self) -> Option<u64> {
        self.limit
    }

    fn validate(&self) -> Result<()> {
        if let Some(q) = &self.queue {
            validate_queue(q)?;
        }
        if let Some(r) = &self.reason {
            let n = r.chars().count();
            if n == 0 || n > MAX_REASON_CHARS {
                return Err(Error::arg(format!(
                    "reason must be 1 to {MAX_REASON_CHARS} characters (got {n}); \
                     the reasons the engine writes are max_deliveries, retry_terminal and rejected"
                )));
            }
        }
        if let (Some(s), Some(u)) = (self.since, self.until)
            && s >= u
        {
            return Err(Error::arg(format!(
                "since ({s}) must be before until ({u}); the range would match nothing"
            )));
        }
        if self.limit == Some(0) {
            return Err(Error::arg("limit must be >= 1, got 0"));
        }
        Ok(())
    }

    fn require_restriction(&self, op: &str) -> Result<()> {
        if self.is_unrestricted() && !self.all {
            return Err(Error::arg(format!(
                "refusing to {op} every dead letter with an empty filter: give a queue, reason, \
                 since, until or ids, or ask for everything explicitly with DlqFilter::all() \
                 (CLI: --all). A limit alone is not a filter"
            )));
        }
        Ok(())
    }

    fn limit_i64(&self) -> Option<i64> {
        self.limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
    }

    fn clause(&self) -> Clause {
        let mut c = Clause {
            sql: "TRUE".to_owned(),
            args: Vec::new(),
        };
        if let Some(q) = &self.queue {
            c.push(|n| format!("d.queue = ${n}"), Arg::Text(q.clone()));
        }
        if let Some(r) = &self.reason {
            c.push(|n| format!("d.failure_reason = ${n}"), Arg::Text(r.clone()));
        }
        if let Some(s) = self.since {
            c.push(|n| format!("d.failed_at >= ${n}"), Arg::Time(s));
        }
        if let Some(u) = self.until {
            c.push(|n| format!("d.failed_at < ${n}"), Arg::Time(u));
        }
        if let Some(ids) = &self.ids {
            c.push(
                |n| format!("d.id = ANY(${n}::int8[])"),
                Arg::Ids(ids.clone()),
            );
        }
        c
    }
}

// ---------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------

/// What a replay does with a dead letter's `timer_id`.
///
/// The outbox allows one row per `(queue, timer_id)` (the `<t>_timer_id_uq`
/// index), so a replayed timer row can collide with a live one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplayTimers {
    /// Keep the timer id, so the replayed row can still be cancelled with
    /// [`OutboxBroker::cancel_timer`] and deduplicates later publishes. A dead
    /// letter whose `(queue, timer_id)` already has a live outbox row (or an
    /// earlier dead letter of the same replay) is skipped: it stays in the
    /// dead-letter table and is reported in [`ReplayReport::skipped`].
    #[default]
    Keep,
    /// Replay every row without its timer id (never conflicts; the replayed
    /// row is a plain row that `cancel_timer` no longer finds).
    Drop,
}

/// Options of [`OutboxBroker::dlq_replay_with`].
///
/// ```
/// use outbox_core::ops::{ReplayOptions, ReplayTimers};
///
/// let opts = ReplayOptions::new().dry_run(true).batch_size(1000).timers(ReplayTimers::Drop);
/// assert!(opts.is_dry_run());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOptions {
    dry_run: bool,
    batch_size: u64,
    timers: ReplayTimers,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            batch_size: DEFAULT_REPLAY_BATCH_SIZE,
            timers: ReplayTimers::Keep,
        }
    }
}

impl ReplayOptions {
    /// Moves rows, 500 per batch, keeping timer ids.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only report what would move (and what would be skipped); change nothing.
    pub fn dry_run(mut self, yes: bool) -> Self {
        self.dry_run = yes;
        self
    }

    /// Dead letters per statement (default 500, at least 1). Each batch is one
    /// atomic statement; a large replay commits batch by batch.
    pub fn batch_size(mut self, n: u64) -> Self {
        self.batch_size = n;
        self
    }

    /// What to do with timer ids (default [`ReplayTimers::Keep`]).
    pub fn timers(mut self, timers: ReplayTimers) -> Self {
        self.timers = timers;
        self
    }

    /// Whether this is a dry run.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// The batch size.
    pub fn get_batch_size(&self) -> u64 {
        self.batch_size
    }

    /// The timer policy.
    pub fn get_timers(&self) -> ReplayTimers {
        self.timers
    }
}

/// A dead letter that a replay moved back into the outbox (or, in a dry run,
/// would move).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayedRow {
    /// Its id in the dead-letter table (gone after the replay).
    pub dead_letter_id: i64,
    /// Its id in the outbox before it failed (now in the new row's
    /// [`REPLAYED_FROM_HEADER`] header).
    pub original_id: i64,
    /// The queue.
    pub queue: String,
    /// The timer id it was replayed with (`None` with [`ReplayTimers::Drop`]).
    pub timer_id: Option<String>,
    /// The id of the new outbox row (`None` in a dry run).
    pub new_id: Option<i64>,
}

/// Why a dead letter matched by a replay was not moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipReason {
    /// A live outbox row has the same `(queue, timer_id)`; the dead letter
    /// stays where it is. Replay it later, or with [`ReplayTimers::Drop`].
    LiveTimer,
    /// An earlier dead letter of the same replay has the same
    /// `(queue, timer_id)` and was replayed; this one stays.
    DuplicateTimer,
    /// The row was removed concurrently (another replay or a purge).
    Gone,
}

impl SkipReason {
    /// `live_timer`, `duplicate_timer` or `gone`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::LiveTimer => "live_timer",
            SkipReason::DuplicateTimer => "duplicate_timer",
            SkipReason::Gone => "gone",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dead letter that a replay matched but left in the dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SkippedRow {
    /// Its id in the dead-letter table.
    pub dead_letter_id: i64,
    /// Its id in the outbox before it failed.
    pub original_id: i64,
    /// The queue.
    pub queue: String,
    /// Its timer id.
    pub timer_id: Option<String>,
    /// Why it was not moved.
    pub reason: SkipReason,
}

/// The outcome of [`OutboxBroker::dlq_replay`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// True for a dry run: nothing was changed.
    pub dry_run: bool,
    /// The rows moved back into the outbox (in a dry run: that would move), by
    /// dead-letter id.
    pub replayed: Vec<ReplayedRow>,
    /// The rows matched but left in the dead-letter table.
    pub skipped: Vec<SkippedRow>,
    /// Statements run (one per batch).
    pub batches: u32,
}

impl ReplayReport {
    /// Replayed rows per queue.
    pub fn per_queue(&self) -> BTreeMap<&str, u64> {
        let mut m = BTreeMap::new();
        for r in &self.replayed {
            *m.entry(r.queue.as_str()).or_insert(0) += 1;
        }
        m
    }
}

/// Progress of a replay, reported after every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayProgress {
    /// Batches done.
    pub batches: u32,
    /// Dead letters examined so far (`replayed + skipped`).
    pub done: u64,
    /// Replayed so far (would be, in a dry run).
    pub replayed: u64,
    /// Skipped so far.
    pub skipped: u64,
    /// Dead letters the filter matched when the replay started (rows failing
    /// after that are not replayed by this call).
    pub total: u64,
}

/// One batch of a replay.
struct ReplayBatch<'a> {
    /// The outbox table, qualified.
    t: &'a str,
    /// The dead-letter table, qualified.
    d: &'a str,
    cursor: i64,
    upper: i64,
    batch: i64,
    keep_timers: bool,
    /// The NOTIFY channel; `None` for a dry run.
    channel: Option<&'a str>,
}

/// The replay statement for one batch. Parameters: the filter's, then
/// `$k+1` the id cursor (exclusive), `$k+2` the id upper bound (inclusive),
/// `$k+3` the batch size and, unless a dry run, `$k+4` the NOTIFY channel.
///
/// Returns `kind, id, original_id, queue, text, verdict` rows (no joins: the
/// CTEs' row counts are unknown to the planner, and a nested loop over them
/// is quadratic):
/// - `v`: one per examined dead letter, with its `timer_id` and verdict
///   (`move`, `live_timer` or `duplicate_timer`);
/// - `m`: one per dead letter actually deleted (a `move` without one was
///   removed concurrently);
/// - `i`: one per inserted outbox row: new id, queue, and the original id it
///   came from (the [`REPLAYED_FROM_HEADER`] value);
/// - `n`: the number of NOTIFYs sent (forces their evaluation).
///
/// A dry run returns only `v` rows.
fn replay_sql(b: &ReplayBatch<'_>, clause: &mut Clause) -> String {
    let ReplayBatch {
        t,
        d,
        keep_timers,
        channel,
        ..
    } = *b;
    let cursor = clause.param(Arg::Int(b.cursor));
    let upper = clause.param(Arg::Int(b.upper));
    let batch = clause.param(Arg::Int(b.batch));
    let verdict = if keep_timers {
        format!(
            "CASE WHEN c.timer_id IS NULL THEN 'move' \
             WHEN EXISTS (SELECT 1 FROM {t} o WHERE o.queue = c.queue AND o.timer_id = c.timer_id) THEN 'live_timer' \
             WHEN row_number() OVER (PARTITION BY c.queue, c.timer_id ORDER BY c.id) > 1 THEN 'duplicate_timer' \
             ELSE 'move' END"
        )
    } else {
        "'move'".to_owned()
    };
    let head = format!(
        "WITH cand AS (SELECT d.id, d.original_id, d.queue, d.timer_id FROM {d} d \
         WHERE {w} AND d.id > {cursor} AND d.id <= {upper} ORDER BY d.id LIMIT {batch}), \
         verdict AS (SELECT c.id, c.original_id, c.queue, c.timer_id, {verdict} AS verdict FROM cand c)",
        w = clause.sql,
    );
    let Some(channel) = channel else {
        return format!(
            "{head} SELECT 'v', v.id, v.original_id, v.queue::text, v.timer_id::text, v.verdict \
             FROM verdict v"
        );
    };
    let channel = clause.param(Arg::Text(channel.to_owned()));
    let timer_col = if keep_timers { "m.timer_id" } else { "NULL" };
    // The new row keeps payload, queue and headers (hence the correlation id;
    // a row that had none gets the id its handler saw: the original row id),
    // records where it came from, and starts over: attempts, deliveries and
    // schedule take the column defaults.
    format!(
        "{head}, \
         moved AS (DELETE FROM {d} x USING verdict v WHERE x.id = v.id AND v.verdict = 'move' \
         RETURNING x.id, x.original_id, x.queue, x.payload, x.headers, x.timer_id), \
         ins AS (INSERT INTO {t} (queue, payload, headers, timer_id) \
         SELECT m.queue, m.payload, \
         jsonb_build_object('{cid}', m.original_id::text) \
         || CASE WHEN jsonb_typeof(m.headers) = 'object' THEN m.headers ELSE '{{}}'::jsonb END \
         || jsonb_build_object('{rf}', m.original_id::text), \
         {timer_col} FROM moved m ORDER BY m.id \
         RETURNING id, queue, headers ->> '{rf}' AS from_id), \
         notified AS (SELECT count(pg_notify({channel}, q.queue)) AS n FROM (SELECT DISTINCT i.queue FROM ins i) q) \
         SELECT 'v', v.id, v.original_id, v.queue::text, v.timer_id::text, v.verdict FROM verdict v \
         UNION ALL SELECT 'm', m.id, m.original_id, m.queue::text, NULL, NULL FROM moved m \
         UNION ALL SELECT 'i', i.id, NULL, i.queue::text, i.from_id, NULL FROM ins i \
         UNION ALL SELECT 'n', n.n, NULL, NULL, NULL, NULL FROM notified n",
        cid = CORRELATION_ID,
        rf = REPLAYED_FROM_HEADER,
    )
}

/// A dead letter examined by one replay batch.
#[derive(Debug)]
struct Examined {
    id: i64,
    original_id: i64,
    queue: String,
    timer_id: Option<String>,
    verdict: String,
}

/// The rows of one replay batch (see [`replay_sql`]), paired up.
#[derive(Debug, Default)]
struct BatchRows {
    /// In dead-letter id order.
    examined: Vec<Examined>,
    /// Dead-letter ids actually deleted.
    deleted: HashSet<i64>,
    /// Dead-letter id -> new outbox id.
    new_ids: BTreeMap<i64, i64>,
}

impl BatchRows {
    fn read(rows: &[PgRow]) -> Result<Self, sqlx::Error> {
        let mut out = Self::default();
        // (queue, original id) -> deleted dead-letter ids / new outbox ids.
        let mut moved: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
        let mut inserted: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
        for row in rows {
            let kind: String = row.try_get(0)?;
            let id: i64 = row.try_get(1)?;
            match kind.as_str() {
                "v" => out.examined.push(Examined {
                    id,
                    original_id: row.try_get(2)?,
                    queue: row.try_get(3)?,
                    timer_id: row.try_get(4)?,
                    verdict: row.try_get(5)?,
                }),
                "m" => {
                    let original: i64 = row.try_get(2)?;
                    out.deleted.insert(id);
                    moved
                        .entry((row.try_get(3)?, original.to_string()))
                        .or_default()
                        .push(id);
                }
                "i" => inserted
                    .entry((row.try_get(3)?, row.try_get(4)?))
                    .or_default()
                    .push(id),
                _ => {}
            }
        }
        out.examined.sort_by_key(|e| e.id);
        // Rows are inserted in dead-letter id order, so new ids ascend with
        // dead-letter ids; pairing by rank within (queue, original id) is
        // exact even when a foreign writer reused an original id.
        for (key, mut dead) in moved {
            let Some(mut new) = inserted.remove(&key) else {
                continue;
            };
            dead.sort_unstable();
            new.sort_unstable();
            out.new_ids.extend(dead.into_iter().zip(new));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Broker methods
// ---------------------------------------------------------------------------

impl OutboxBroker {
    fn require_dlq(&self, op: &str) -> Result<&DlqTable> {
        self.dlq().ok_or_else(|| {
            Error::config(format!(
                "{op} needs a dead-letter table, and this broker has none: configure it with \
                 OutboxBroker::dead_letter_table(DlqTable::new(\"outbox_dlq\")?)"
            ))
        })
    }

    /// Lists the dead letters matching `filter`, oldest (lowest id) first.
    ///
    /// An unrestricted filter lists everything: set a
    /// [`limit`](DlqFilter::limit) on large tables. Errors with
    /// [`Error::InvalidConfig`] when no dead-letter table is configured.
    ///
    /// ```no_run
    /// use outbox_core::ops::DlqFilter;
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// for dl in outbox.dlq_list(&DlqFilter::new().queue("orders").limit(20)).await? {
    ///     println!("{} (was row {}): {} at {}: {:?}",
    ///         dl.id, dl.original_id, dl.failure_reason, dl.failed_at, dl.last_exception);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DeadLetter>> {
        let dlq = self.require_dlq("dlq_list")?;
        filter.validate()?;
        let mut c = filter.clause();
        let limit = match filter.limit_i64() {
            Some(n) => format!(" LIMIT {}", c.param(Arg::Int(n))),
            None => String::new(),
        };
        let sql = format!(
            "SELECT {DLQ_SELECT} FROM {d} d WHERE {w} ORDER BY d.id{limit}",
            d = dlq.qualified_name(),
            w = c.sql
        );
        let rows = bind_all(sqlx::query(sqlx::AssertSqlSafe(sql)), &c.args)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| DeadLetter::from_pg(r).map_err(Error::from))
            .collect()
    }

    /// The dead letter with this id (the dead-letter table's `id`), if any.
    pub async fn dlq_get(&self, id: i64) -> Result<Option<DeadLetter>> {
        let dlq = self.require_dlq("dlq_get")?;
        let sql = format!(
            "SELECT {DLQ_SELECT} FROM {d} d WHERE d.id = $1",
            d = dlq.qualified_name()
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref()
            .map(DeadLetter::from_pg)
            .transpose()
            .map_err(Error::from)
    }

    /// How many dead letters `filter` selects (bounded by its limit).
    pub async fn dlq_count(&self, filter: &DlqFilter) -> Result<u64> {
        Ok(self.dlq_count_and_max(filter, "dlq_count").await?.0)
    }

    async fn dlq_count_and_max(&self, filter: &DlqFilter, op: &str) -> Result<(u64, i64)> {
        let dlq = self.require_dlq(op)?;
        filter.validate()?;
        let mut c = filter.clause();
        let limit = match filter.limit_i64() {
            Some(n) => format!(" ORDER BY d.id LIMIT {}", c.param(Arg::Int(n))),
            None => String::new(),
        };
        let sql = format!(
            "SELECT count(*)::int8, COALESCE(max(s.id), 0)::int8 FROM \
             (SELECT d.id FROM {d} d WHERE {w}{limit}) s",
            d = dlq.qualified_name(),
            w = c.sql
        );
        let row = bind_all(sqlx::query(sqlx::AssertSqlSafe(sql)), &c.args)
            .fetch_one(self.pool())
            .await?;
        Ok((to_u64(row.try_get(0)?), row.try_get(1)?))
    }

    /// Moves the dead letters matching `filter` back into the outbox, with
    /// the default [`ReplayOptions`] (batches of 500, timer ids kept). See
    /// [`dlq_replay_with`](Self::dlq_replay_with).
    pub async fn dlq_replay(&self, filter: &DlqFilter) -> Result<ReplayReport> {
        self.dlq_replay_with(filter, &ReplayOptions::default(), |_| {})
            .await
    }

    /// Moves the dead letters matching `filter` back into the outbox, in id
    /// order, `batch_size` rows per statement, calling `progress` after each
    /// batch.
    ///
    /// Each batch is **one statement**: `DELETE` from the dead-letter table
    /// and `INSERT` into the outbox in a data-modifying CTE, so a row is in
    /// exactly one of the two tables whatever fails (a failing insert leaves
    /// the batch in the dead-letter table). The new row keeps the queue, the
    /// payload and the headers (hence the correlation id; a row without one
    /// gets the original row id, which is what its handler saw), gets a
    /// [`REPLAYED_FROM_HEADER`] header with the `original_id`, a new id, and
    /// starts over (no attempts, no deliveries, due now). The relays of every
    /// touched queue are woken with one NOTIFY per queue, on commit.
    ///
    /// Timer ids follow [`ReplayOptions::timers`]: by default they are kept and
    /// a row whose `(queue, timer_id)` is live in the outbox is skipped (a
    /// concurrent publish of the same timer between the check and the insert
    /// fails the batch with a unique violation, changing nothing; run again).
    ///
    /// Only dead letters present when the replay starts are considered, so a
    /// replayed row that fails again is not replayed again by the same call.
    /// A batch that fails returns the error; earlier batches stay committed
    /// (and were reported to `progress`), and running the same replay again
    /// continues where it stopped.
    ///
    /// Refuses an [unrestricted](DlqFilter::is_unrestricted) filter unless it
    /// was built with [`DlqFilter::all`].
    ///
    /// ```no_run
    /// use outbox_core::ops::{DlqFilter, ReplayOptions};
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let filter = DlqFilter::new().queue("orders").reason("retry_terminal");
    /// let preview = outbox.dlq_replay_with(&filter, &ReplayOptions::new().dry_run(true), |_| {}).await?;
    /// println!("would replay {} rows", preview.replayed.len());
    /// let done = outbox
    ///     .dlq_replay_with(&filter, &ReplayOptions::new().batch_size(1000), |p| {
    ///         eprintln!("{}/{} replayed", p.replayed, p.total);
    ///     })
    ///     .await?;
    /// for r in &done.replayed {
    ///     println!("dead letter {} -> outbox row {:?}", r.dead_letter_id, r.new_id);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn dlq_replay_with<F>(
        &self,
        filter: &DlqFilter,
        opts: &ReplayOptions,
        mut progress: F,
    ) -> Result<ReplayReport>
    where
        F: FnMut(&ReplayProgress),
    {
        let dlq = self.require_dlq("dlq_replay")?;
        filter.validate()?;
        filter.require_restriction("replay")?;
        if opts.batch_size == 0 {
            return Err(Error::arg("batch_size must be >= 1, got 0"));
        }
        let (total, upper) = self.dlq_count_and_max(filter, "dlq_replay").await?;
        let mut report = ReplayReport {
            dry_run: opts.dry_run,
            ..ReplayReport::default()
        };
        if total == 0 {
            return Ok(report);
        }
        let keep_timers = opts.timers == ReplayTimers::Keep;
        let t = self.table().qualified_name();
        let d = dlq.qualified_name();
        let channel = (!opts.dry_run).then(|| self.channel().to_owned());
        let mut remaining = filter.limit.unwrap_or(u64::MAX);
        let mut cursor = i64::MIN;
        // (queue, timer_id) replayed by earlier batches of this call.
        let mut timers_moved: HashSet<(String, String)> = HashSet::new();
        let mut done = 0u64;
        while remaining > 0 {
            let batch = opts.batch_size.min(remaining);
            let mut c = filter.clause();
            let b = ReplayBatch {
                t: &t,
                d: &d,
                cursor,
                upper,
                batch: i64::try_from(batch).unwrap_or(i64::MAX),
                keep_timers,
                channel: channel.as_deref(),
            };
            let sql = replay_sql(&b, &mut c);
            let rows = bind_all(sqlx::query(sqlx::AssertSqlSafe(sql)), &c.args)
                .fetch_all(self.pool())
                .await?;
            report.batches += 1;
            let batch_rows = BatchRows::read(&rows)?;
            let n = u64::try_from(batch_rows.examined.len()).unwrap_or(u64::MAX);
            for ex in batch_rows.examined {
                cursor = cursor.max(ex.id);
                let new_id = batch_rows.new_ids.get(&ex.id).copied();
                let key = ex.timer_id.clone().map(|tid| (ex.queue.clone(), tid));
                let seen_timer = key.as_ref().is_some_and(|k| timers_moved.contains(k));
                let skip = match ex.verdict.as_str() {
                    // In a dry run nothing was inserted: a timer "moved" by an
                    // earlier batch is a duplicate, as the real run would find.
                    // (A real run reports what its statement did.)
                    "move" if opts.dry_run && keep_timers && seen_timer => {
                        Some(SkipReason::DuplicateTimer)
                    }
                    "move" if !opts.dry_run && !batch_rows.deleted.contains(&ex.id) => {
                        Some(SkipReason::Gone)
                    }
                    "move" => None,
                    "duplicate_timer" => Some(SkipReason::DuplicateTimer),
                    // A live row that this very replay created is a duplicate.
                    _ if seen_timer => Some(SkipReason::DuplicateTimer),
                    _ => Some(SkipReason::LiveTimer),
                };
                match skip {
                    None => {
                        if let Some(k) = key.filter(|_| keep_timers) {
                            timers_moved.insert(k);
                        }
                        report.replayed.push(ReplayedRow {
                            dead_letter_id: ex.id,
                            original_id: ex.original_id,
                            queue: ex.queue,
                            timer_id: if keep_timers { ex.timer_id } else { None },
                            new_id,
                        });
                    }
                    Some(reason) => report.skipped.push(SkippedRow {
                        dead_letter_id: ex.id,
                        original_id: ex.original_id,
                        queue: ex.queue,
                        timer_id: ex.timer_id,
                        reason,
                    }),
                }
            }
            done += n;
            remaining = remaining.saturating_sub(n);
            progress(&ReplayProgress {
                batches: report.batches,
                done,
                replayed: u64::try_from(report.replayed.len()).unwrap_or(u64::MAX),
                skipped: u64::try_from(report.skipped.len()).unwrap_or(u64::MAX),
                total,
            });
            if n < batch {
                break;
            }
        }
        if !opts.dry_run {
            tracing::info!(
                replayed = report.replayed.len(),
                skipped = report.skipped.len(),
                batches = report.batches,
                "dead letters replayed into the outbox"
            );
        }
        Ok(report)
    }

    /// Deletes the dead letters matching `filter` (the oldest `limit` of them,
    /// if a limit is set) in one statement and returns how many were deleted.
    ///
    /// Refuses an [unrestricted](DlqFilter::is_unrestricted) filter with
    /// [`Error::InvalidArgument`] unless it was built with [`DlqFilter::all`].
    ///
    /// ```no_run
    /// use outbox_core::ops::DlqFilter;
    /// # async fn demo(outbox: outbox_core::OutboxBroker) -> Result<(), outbox_core::Error> {
    /// let month_ago = chrono::Utc::now() - chrono::Duration::days(30);
    /// let n = outbox.dlq_purge(&DlqFilter::new().until(month_ago)).await?;
    /// println!("purged {n} dead letters older than 30 days");
    /// # Ok(()) }
    /// ```
    pub async fn dlq_purge(&self, filter: &DlqFilter) -> Result<u64> {
        let dlq = self.require_dlq("dlq_purge")?;
        filter.validate()?;
        filter.require_restriction("purge")?;
        let d = dlq.qualified_name();
        let mut c = filter.clause();
        let sql = match filter.limit_i64() {
            Some(n) => {
                let p = c.param(Arg::Int(n));
                format!(
                    "DELETE FROM {d} x WHERE x.id IN \
                     (SELECT d.id FROM {d} d WHERE {w} ORDER BY d.id LIMIT {p})",
                    w = c.sql
                )
            }
            None => format!("DELETE FROM {d} d WHERE {w}", w = c.sql),
        };
        let done = bind_all(sqlx::query(sqlx::AssertSqlSafe(sql)), &c.args)
            .execute(self.pool())
            .await?;
        let n = done.rows_affected();
        tracing::info!(purged = n, "dead letters purged");
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_clause_numbers_parameters_in_order() {
        let f = DlqFilter::new()
            .queue("q")
            .reason("rejected")
            .since(Utc::now() - chrono::Duration::hours(1))
            .ids([1, 2]);
        let c = f.clause();
        assert_eq!(
            c.sql,
            "TRUE AND d.queue = $1 AND d.failure_reason = $2 AND d.failed_at >= $3 AND d.id = ANY($4::int8[])"
        );
        assert_eq!(c.args.len(), 4);
    }

    #[test]
    fn empty_filters_are_refused_for_destructive_operations() {
        let err = DlqFilter::new()
            .limit(5)
            .require_restriction("purge")
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing to purge"), "{err}");
        assert!(err.contains("--all"), "{err}");
        DlqFilter::all().require_restriction("purge").expect("all");
        DlqFilter::new()
            .queue("q")
            .require_restriction("purge")
            .expect("queue");
        // An empty id list is a criterion that matches nothing.
        DlqFilter::new()
            .ids([])
            .require_restriction("purge")
            .expect("ids");
    }

    #[test]
    fn filter_values_are_validated() {
        let bad = [
            DlqFilter::new().queue(""),
            DlqFilter::new().reason("r".repeat(65)),
            DlqFilter::new().limit(0),
            DlqFilter::new()
                .since(Utc::now())
                .until(Utc::now() - chrono::Duration::seconds(1)),
        ];
        for f in bad {
            let err = f.validate().unwrap_err();
            assert!(err.is_misuse(), "{err}");
        }
    }

    #[test]
    fn replay_statement_is_one_cte_with_one_notify_per_queue() {
        let mut c = DlqFilter::new().queue("q").clause();
        let b = ReplayBatch {
            t: r#""s"."t""#,
            d: r#""s"."t_dlq""#,
            cursor: 0,
            upper: 10,
            batch: 5,
            keep_timers: true,
            channel: Some("outbox_t"),
        };
        let sql = replay_sql(&b, &mut c);
        assert!(
            sql.contains(r#"moved AS (DELETE FROM "s"."t_dlq" x USING verdict v"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"ins AS (INSERT INTO "s"."t" (queue, payload, headers, timer_id)"#),
            "{sql}"
        );
        assert!(
            sql.contains("count(pg_notify($5, q.queue))")
                && sql.contains("SELECT DISTINCT i.queue"),
            "{sql}"
        );
        assert!(sql.contains("'live_timer'"), "{sql}");
        assert_eq!(c.args.len(), 5);
        let mut c = DlqFilter::all().clause();
        let b = ReplayBatch {
            channel: None,
            keep_timers: false,
            ..b
        };
        let dry = replay_sql(&b, &mut c);
        assert!(
            !dry.contains("DELETE") && !dry.contains("pg_notify"),
            "{dry}"
        );
    }
}
