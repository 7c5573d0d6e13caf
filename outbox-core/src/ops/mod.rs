//! Operations: queue statistics, the dashboard's overview (capped counts,
//! table activity, relay connections, row lookup), dead-letter inspection,
//! replay and purge, autovacuum tuning. The `outbox` command-line tool is built on these.
//!
//! Everything here runs on the broker's pool (never on a caller's
//! transaction), reads only through the validated table definitions, and binds
//! every value as a parameter. On the in-memory store of the test harness,
//! which has no SQL, every operation here returns
//! [`Error::Unsupported`] naming itself.
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

// The files: `stats` (`OutboxBroker::stats`), `overview` (the dashboard's
// `OutboxBroker::overview`, `table_activity`, `connections`, `find_rows`), `dlq` (the `DlqFilter` and
// listing, counting and purging dead letters), `replay` (moving dead letters
// back into the outbox); the SQL they share (the filter's `WHERE` clause and
// its parameters) is here. The row types and the autovacuum DDL come from the
// storage layer. Nothing here depends on the engine or the App.

mod dlq;
mod overview;
mod replay;
mod stats;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgArguments;

use crate::broker::OutboxBroker;
use crate::error::{Error, Result};
use crate::store::DlqTable;
pub use crate::store::{AutovacuumOptions, DeadLetter, QueueStats, autovacuum_sql};
pub use dlq::DlqFilter;
pub use overview::{
    Count, DEFAULT_OVERVIEW_CAP, FIND_ROWS_LIMIT, OverviewOptions, QueueOverview,
    ROW_PAYLOAD_LIMIT, RelayConnection, RowLookup, RowState, RowView, TableActivity,
};
pub use replay::{
    DEFAULT_REPLAY_BATCH_SIZE, REPLAYED_FROM_HEADER, ReplayOptions, ReplayProgress, ReplayReport,
    ReplayTimers, ReplayedRow, SkipReason, SkippedRow,
};

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

/// [`bind_all`] for a statement whose rows decode into `T`.
fn bind_all_as<'q, T>(
    mut q: sqlx::query::QueryAs<'q, sqlx::Postgres, T, PgArguments>,
    args: &[Arg],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, T, PgArguments> {
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

impl OutboxBroker {
    /// The pool `op` runs on, or [`Error::Unsupported`] on a backend without
    /// one (the in-memory store of the test harness).
    fn ops_pool(&self, op: &'static str) -> Result<&sqlx::PgPool> {
        self.backend().pool_for(op)
    }

    /// For the tests that check the plan of an exactly-once lane's claim:
    /// its `EXPLAIN (ANALYZE, BUFFERS)` lines for a lot of `limit` rows of
    /// `queues` in lane `lane` of `lanes`, run as a lot runs it and rolled
    /// back. Not a stable API.
    #[doc(hidden)]
    pub async fn lane_claim_plan(
        &self,
        queues: &[String],
        limit: usize,
        lanes: u32,
        lane: u32,
    ) -> Result<Vec<String>> {
        let mut conn = self.ops_pool("lane_claim_plan")?.acquire().await?;
        let lines = crate::store::lane::explain_claim(
            &self.stmts().lane,
            &mut conn,
            queues,
            limit,
            lanes,
            lane,
        )
        .await?;
        Ok(lines)
    }

    fn require_dlq(&self, op: &str) -> Result<&DlqTable> {
        self.dlq().ok_or_else(|| {
            Error::config(format!(
                "{op} needs a dead-letter table, and this broker has none: configure it with \
                 OutboxBroker::dead_letter_table(DlqTable::new(\"outbox_dlq\")?)"
            ))
        })
    }
}
