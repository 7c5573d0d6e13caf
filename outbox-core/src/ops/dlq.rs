//! Dead letters: the [`DlqFilter`] that selects them, and listing, counting
//! and purging them.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Arg, Clause, bind_all, bind_all_as};
use crate::broker::OutboxBroker;
use crate::error::{Error, Result};
use crate::publish::validate_queue;
use crate::store::DeadLetter;
use crate::store::dead_letter::DLQ_SELECT;

/// Longest `failure_reason` (the column is `VARCHAR(64)`).
const MAX_REASON_CHARS: usize = 64;

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

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

    pub(super) fn validate(&self) -> Result<()> {
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

    pub(super) fn require_restriction(&self, op: &str) -> Result<()> {
        if self.is_unrestricted() && !self.all {
            return Err(Error::arg(format!(
                "refusing to {op} every dead letter with an empty filter: give a queue, reason, \
                 since, until or ids, or ask for everything explicitly with DlqFilter::all() \
                 (CLI: --all). A limit alone is not a filter"
            )));
        }
        Ok(())
    }

    pub(super) fn limit_i64(&self) -> Option<i64> {
        self.limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
    }

    pub(super) fn clause(&self) -> Clause {
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

impl OutboxBroker {
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
        let rows = bind_all_as(sqlx::query_as(sqlx::AssertSqlSafe(sql)), &c.args)
            .fetch_all(self.ops_pool("dlq_list")?)
            .await?;
        Ok(rows)
    }

    /// The dead letter with this id (the dead-letter table's `id`), if any.
    pub async fn dlq_get(&self, id: i64) -> Result<Option<DeadLetter>> {
        let dlq = self.require_dlq("dlq_get")?;
        let sql = format!(
            "SELECT {DLQ_SELECT} FROM {d} d WHERE d.id = $1",
            d = dlq.qualified_name()
        );
        let row = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(self.ops_pool("dlq_get")?)
            .await?;
        Ok(row)
    }

    /// How many dead letters `filter` selects (bounded by its limit).
    pub async fn dlq_count(&self, filter: &DlqFilter) -> Result<u64> {
        Ok(self.dlq_count_and_max(filter, "dlq_count").await?.0)
    }

    pub(super) async fn dlq_count_and_max(
        &self,
        filter: &DlqFilter,
        op: &'static str,
    ) -> Result<(u64, i64)> {
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
            .fetch_one(self.ops_pool(op)?)
            .await?;
        Ok((to_u64(row.try_get(0)?), row.try_get(1)?))
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
            .execute(self.ops_pool("dlq_purge")?)
            .await?;
        let n = done.rows_affected();
        // The log target of every `ops` message (RUST_LOG filters).
        tracing::info!(target: "outbox_core::ops", purged = n, "dead letters purged");
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
}
