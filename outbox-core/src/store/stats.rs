//! Per-queue counts of the outbox and dead-letter tables ([`QueueStats`]):
//! what [`OutboxBroker::stats`](crate::OutboxBroker::stats) returns and the
//! engine's gauge sampler reads.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::{PgPool, Row};

use super::table::{DlqTable, OutboxTable};
use crate::error::Result;

/// The state of one queue, as counted by
/// [`OutboxBroker::stats`](crate::OutboxBroker::stats).
///
/// All times are measured on the database clock.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// The queue name.
    pub queue: String,
    /// Unleased rows that are due (`next_attempt_at <= now()`): claimable now.
    pub ready: u64,
    /// Rows under a lease (being handled, or held by a relay that died and
    /// whose lease has not expired yet).
    pub leased: u64,
    /// Unleased rows that are not due yet (delayed publishes, retries waiting
    /// for their back-off).
    pub scheduled: u64,
    /// How long the oldest ready row has been due (`now() - min(next_attempt_at)`
    /// over ready rows): the relay lag. `None` when nothing is ready.
    pub oldest_ready_age: Option<Duration>,
    /// Rows of this queue in the dead-letter table (0 when none is configured).
    pub dead_letters: u64,
}

impl QueueStats {
    fn empty(queue: &str) -> Self {
        Self {
            queue: queue.to_owned(),
            ready: 0,
            leased: 0,
            scheduled: 0,
            oldest_ready_age: None,
            dead_letters: 0,
        }
    }

    /// Rows of this queue still in the outbox (`ready + leased + scheduled`).
    pub fn in_outbox(&self) -> u64 {
        self.ready + self.leased + self.scheduled
    }
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Per queue of the outbox: `ready`, `scheduled`, `leased`, age of the oldest
/// ready row in seconds. One statement, two branches, each restricted to the
/// predicate of one partial index (`<t>_pending_idx`, `<t>_leased_idx`), so
/// each can be answered by an index-only scan. `$1` (optional): `varchar[]`.
fn outbox_stats_sql(t: &str, filtered: bool) -> String {
    let f = if filtered {
        " AND o.queue = ANY($1::varchar[])"
    } else {
        ""
    };
    format!(
        "SELECT s.queue::text, sum(s.ready)::int8, sum(s.scheduled)::int8, sum(s.leased)::int8, \
         extract(epoch FROM now() - min(s.oldest))::float8 \
         FROM (\
         SELECT o.queue, count(*) FILTER (WHERE o.next_attempt_at <= now()) AS ready, \
         count(*) FILTER (WHERE o.next_attempt_at > now()) AS scheduled, 0::int8 AS leased, \
         min(o.next_attempt_at) FILTER (WHERE o.next_attempt_at <= now()) AS oldest \
         FROM {t} o WHERE o.acquired_token IS NULL{f} GROUP BY o.queue \
         UNION ALL \
         SELECT o.queue, 0::int8, 0::int8, count(*), NULL::timestamptz \
         FROM {t} o WHERE o.acquired_token IS NOT NULL{f} GROUP BY o.queue\
         ) s GROUP BY s.queue"
    )
}

/// Per queue of the dead-letter table: row count (the `(queue, failed_at)`
/// index answers it).
fn dlq_stats_sql(d: &str, filtered: bool) -> String {
    let f = if filtered {
        " WHERE d.queue = ANY($1::varchar[])"
    } else {
        ""
    };
    format!("SELECT d.queue::text, count(*)::int8 FROM {d} d{f} GROUP BY d.queue")
}

/// Counts the queues of `table` (and of `dlq`, if given): every queue present
/// in either table, or exactly `queues` (with zeros for a queue that has no
/// rows). Sorted by queue name; the names are not validated here.
pub(crate) async fn collect(
    pool: &PgPool,
    table: &OutboxTable,
    dlq: Option<&DlqTable>,
    queues: Option<&[&str]>,
) -> Result<Vec<QueueStats>> {
    let mut out: BTreeMap<String, QueueStats> = BTreeMap::new();
    let names: Option<Vec<String>> = queues.map(|qs| {
        qs.iter()
            .map(|q| {
                out.entry((*q).to_owned())
                    .or_insert_with(|| QueueStats::empty(q));
                (*q).to_owned()
            })
            .collect()
    });
    let t = table.qualified_name();
    let sql = outbox_stats_sql(&t, names.is_some());
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    if let Some(n) = &names {
        q = q.bind(n.clone());
    }
    for row in q.fetch_all(pool).await? {
        let queue: String = row.try_get(0)?;
        let age: Option<f64> = row.try_get(4)?;
        let e = out
            .entry(queue)
            .or_insert_with_key(|k| QueueStats::empty(k));
        e.ready = to_u64(row.try_get(1)?);
        e.scheduled = to_u64(row.try_get(2)?);
        e.leased = to_u64(row.try_get(3)?);
        e.oldest_ready_age = age.and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok());
    }
    if let Some(dlq) = dlq {
        let sql = dlq_stats_sql(&dlq.qualified_name(), names.is_some());
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(n) = &names {
            q = q.bind(n.clone());
        }
        for row in q.fetch_all(pool).await? {
            let queue: String = row.try_get(0)?;
            let e = out
                .entry(queue)
                .or_insert_with_key(|k| QueueStats::empty(k));
            e.dead_letters = to_u64(row.try_get(1)?);
        }
    }
    Ok(out.into_values().collect())
}
