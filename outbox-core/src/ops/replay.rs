//! Replay: moving dead letters back into the outbox
//! ([`OutboxBroker::dlq_replay`], [`OutboxBroker::dlq_replay_with`]).

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{Arg, Clause, DlqFilter, bind_all};
use crate::broker::OutboxBroker;
use crate::envelope::CORRELATION_ID;
use crate::error::{Error, Result};

/// The header a replayed row carries: the `original_id` of the dead letter it
/// was replayed from (the id the row had in the outbox before it failed).
pub const REPLAYED_FROM_HEADER: &str = "x-outbox-replayed-from";

/// Default number of dead letters moved per statement by a replay.
pub const DEFAULT_REPLAY_BATCH_SIZE: u64 = 500;

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
         RETURNING x.id, x.original_id, x.queue, x.payload, x.headers, x.timer_id, x.ordering_key), \
         ins AS (INSERT INTO {t} (queue, payload, headers, timer_id, ordering_key) \
         SELECT m.queue, m.payload, \
         jsonb_build_object('{cid}', m.original_id::text) \
         || CASE WHEN jsonb_typeof(m.headers) = 'object' THEN m.headers ELSE '{{}}'::jsonb END \
         || jsonb_build_object('{rf}', m.original_id::text), \
         {timer_col}, m.ordering_key FROM moved m ORDER BY m.id \
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

impl OutboxBroker {
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
        let mut replay = Replay::new(opts);
        if total == 0 {
            return Ok(replay.report);
        }
        let t = self.table().qualified_name();
        let d = dlq.qualified_name();
        let channel = (!opts.dry_run).then(|| self.channel().to_owned());
        let mut remaining = filter.get_limit().unwrap_or(u64::MAX);
        let mut done = 0u64;
        while remaining > 0 {
            let batch = opts.batch_size.min(remaining);
            let b = ReplayBatch {
                t: &t,
                d: &d,
                cursor: replay.cursor,
                upper,
                batch: i64::try_from(batch).unwrap_or(i64::MAX),
                keep_timers: replay.keep_timers,
                channel: channel.as_deref(),
            };
            let rows = self.replay_batch(filter, &b).await?;
            replay.report.batches += 1;
            let n = replay.record(rows);
            done += n;
            remaining = remaining.saturating_sub(n);
            progress(&replay.progress(done, total));
            if n < batch {
                break;
            }
        }
        let report = replay.report;
        if !opts.dry_run {
            // The log target of every `ops` message (RUST_LOG filters).
            tracing::info!(
                target: "outbox_core::ops",
                replayed = report.replayed.len(),
                skipped = report.skipped.len(),
                batches = report.batches,
                "dead letters replayed into the outbox"
            );
        }
        Ok(report)
    }

    /// Runs one batch's statement and reads its rows.
    async fn replay_batch(&self, filter: &DlqFilter, b: &ReplayBatch<'_>) -> Result<BatchRows> {
        let mut c = filter.clause();
        let sql = replay_sql(b, &mut c);
        let rows = bind_all(sqlx::query(sqlx::AssertSqlSafe(sql)), &c.args)
            .fetch_all(self.ops_pool("dlq_replay")?)
            .await?;
        Ok(BatchRows::read(&rows)?)
    }
}

/// What a replay carries from one batch to the next.
struct Replay {
    report: ReplayReport,
    dry_run: bool,
    keep_timers: bool,
    /// The highest dead-letter id examined so far.
    cursor: i64,
    /// (queue, timer_id) replayed by earlier batches of this call.
    timers_moved: HashSet<(String, String)>,
}

impl Replay {
    fn new(opts: &ReplayOptions) -> Self {
        Self {
            report: ReplayReport {
                dry_run: opts.dry_run,
                ..ReplayReport::default()
            },
            dry_run: opts.dry_run,
            keep_timers: opts.timers == ReplayTimers::Keep,
            cursor: i64::MIN,
            timers_moved: HashSet::new(),
        }
    }

    /// Sorts one batch's dead letters into replayed and skipped; returns how
    /// many it examined.
    fn record(&mut self, rows: BatchRows) -> u64 {
        let BatchRows {
            examined,
            deleted,
            new_ids,
        } = rows;
        let n = u64::try_from(examined.len()).unwrap_or(u64::MAX);
        for ex in examined {
            self.cursor = self.cursor.max(ex.id);
            let new_id = new_ids.get(&ex.id).copied();
            let key = ex.timer_id.clone().map(|tid| (ex.queue.clone(), tid));
            let seen_timer = key.as_ref().is_some_and(|k| self.timers_moved.contains(k));
            match self.skip_reason(&ex, seen_timer, deleted.contains(&ex.id)) {
                None => {
                    if let Some(k) = key.filter(|_| self.keep_timers) {
                        self.timers_moved.insert(k);
                    }
                    self.report.replayed.push(ReplayedRow {
                        dead_letter_id: ex.id,
                        original_id: ex.original_id,
                        queue: ex.queue,
                        timer_id: if self.keep_timers { ex.timer_id } else { None },
                        new_id,
                    });
                }
                Some(reason) => self.report.skipped.push(SkippedRow {
                    dead_letter_id: ex.id,
                    original_id: ex.original_id,
                    queue: ex.queue,
                    timer_id: ex.timer_id,
                    reason,
                }),
            }
        }
        n
    }

    /// Why an examined dead letter was not replayed, if it was not.
    fn skip_reason(&self, ex: &Examined, seen_timer: bool, deleted: bool) -> Option<SkipReason> {
        match ex.verdict.as_str() {
            // In a dry run nothing was inserted: a timer "moved" by an
            // earlier batch is a duplicate, as the real run would find.
            // (A real run reports what its statement did.)
            "move" if self.dry_run && self.keep_timers && seen_timer => {
                Some(SkipReason::DuplicateTimer)
            }
            "move" if !self.dry_run && !deleted => Some(SkipReason::Gone),
            "move" => None,
            "duplicate_timer" => Some(SkipReason::DuplicateTimer),
            // A live row that this very replay created is a duplicate.
            _ if seen_timer => Some(SkipReason::DuplicateTimer),
            _ => Some(SkipReason::LiveTimer),
        }
    }

    fn progress(&self, done: u64, total: u64) -> ReplayProgress {
        ReplayProgress {
            batches: self.report.batches,
            done,
            replayed: u64::try_from(self.report.replayed.len()).unwrap_or(u64::MAX),
            skipped: u64::try_from(self.report.skipped.len()).unwrap_or(u64::MAX),
            total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            sql.contains(
                r#"ins AS (INSERT INTO "s"."t" (queue, payload, headers, timer_id, ordering_key)"#
            ),
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
