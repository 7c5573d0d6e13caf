//! The producer side of the storage: the validated rows a publish inserts
//! ([`Insert`], [`BatchInsert`], with their [`Schedule`] and
//! [`TimerConflict`]), and the producer's statements on PostgreSQL (on the
//! caller's connection or transaction). The in-memory backend
//! ([`MemoryStore`](super::memory::MemoryStore), feature `testing`) takes the
//! same values.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use super::row::OutboxRow;
use super::sql::{self, ScheduleKind, Statements, TimerKind};
use crate::envelope::Headers;
use crate::error::Result;

/// What a publish with a `timer_id` does when a live row with the same
/// `(queue, timer_id)` already exists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TimerConflict {
    /// Keep the existing row; the publish is a no-op and returns `None`.
    #[default]
    Ignore,
    /// Keep one row whose deadline is the later of the two. When the new
    /// deadline is later, the payload and headers are replaced and the retry
    /// history reset; `deliveries_count` is kept. A leased row (being handled
    /// right now) is left alone and the publish returns `None`.
    Extend,
}

/// When a published row becomes eligible.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Schedule {
    Now,
    In(Duration),
    At(DateTime<Utc>),
}

fn duration_secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn schedule_kind(schedule: Schedule) -> ScheduleKind {
    match schedule {
        Schedule::Now => ScheduleKind::Now,
        Schedule::In(_) => ScheduleKind::In,
        Schedule::At(_) => ScheduleKind::At,
    }
}

/// One validated, encoded row, ready for the storage backend: what a single
/// publish inserts. Built by [`prepare`](crate::publish::prepare) only, so every backend sees rows
/// that passed the same checks.
#[derive(Debug, Clone)]
pub(crate) struct Insert {
    pub(crate) queue: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Headers,
    pub(crate) schedule: Schedule,
    /// The timer id and what to do on a conflict.
    pub(crate) timer: Option<(String, TimerConflict)>,
    /// The ordering key (`ordering_key` column), if any.
    pub(crate) key: Option<String>,
    /// Whether the insert wakes the relays. Future-dated rows notify too
    /// (faststream-outbox skips them): a relay that wakes looks up when the
    /// earliest one is due and claims it then, instead of at its next poll.
    pub(crate) notify: bool,
}

/// Validated, encoded rows of one batch publish (all on one queue).
#[derive(Debug, Clone)]
pub(crate) struct BatchInsert {
    pub(crate) queue: String,
    pub(crate) payloads: Vec<Vec<u8>>,
    pub(crate) headers: Vec<Headers>,
    pub(crate) schedule: Schedule,
    /// One ordering key for every row of the batch, if any.
    pub(crate) key: Option<String>,
    pub(crate) notify: bool,
}

// ---------------------------------------------------------------------------
// Execution on PostgreSQL (the caller's connection or transaction).
// ---------------------------------------------------------------------------

pub(crate) async fn insert_pg(
    stmts: &Statements,
    channel: &str,
    insert: Insert,
    conn: &mut PgConnection,
) -> Result<Option<i64>> {
    let timer = match &insert.timer {
        None => TimerKind::None,
        Some((_, TimerConflict::Ignore)) => TimerKind::Ignore,
        Some((_, TimerConflict::Extend)) => TimerKind::Extend,
    };
    let notify = insert.notify;
    let keyed = insert.key.is_some();
    let sql = stmts.insert(schedule_kind(insert.schedule), timer, notify, keyed);
    let mut query = sql::q(sql)
        .bind(insert.queue)
        .bind(insert.payload)
        .bind(Json(insert.headers));
    match insert.schedule {
        Schedule::Now => {}
        Schedule::In(d) => query = query.bind(duration_secs(d)),
        Schedule::At(at) => query = query.bind(at),
    }
    if let Some((id, _)) = insert.timer {
        query = query.bind(id);
    }
    if let Some(key) = insert.key {
        query = query.bind(key);
    }
    if notify {
        query = query.bind(channel);
    }
    let row = query.fetch_optional(&mut *conn).await?;
    Ok(match row {
        Some(row) => Some(row.try_get::<i64, _>(0)?),
        None => None,
    })
}

pub(crate) async fn insert_batch_pg(
    stmts: &Statements,
    channel: &str,
    batch: BatchInsert,
    conn: &mut PgConnection,
) -> Result<u64> {
    if batch.payloads.is_empty() {
        return Ok(0);
    }
    let notify = batch.notify;
    let headers: Vec<Json<Headers>> = batch.headers.into_iter().map(Json).collect();
    let sql = stmts.insert_batch(schedule_kind(batch.schedule), notify, batch.key.is_some());
    let mut query = sql::q(sql)
        .bind(batch.queue)
        .bind(batch.payloads)
        .bind(headers);
    match batch.schedule {
        Schedule::Now => {}
        Schedule::In(d) => query = query.bind(duration_secs(d)),
        Schedule::At(at) => query = query.bind(at),
    }
    if let Some(key) = batch.key {
        query = query.bind(key);
    }
    if notify {
        query = query.bind(channel);
    }
    let row = query.fetch_one(&mut *conn).await?;
    let n: i64 = row.try_get(0)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) async fn cancel_timer_pg(
    stmts: &Statements,
    queue: &str,
    timer_id: &str,
    conn: &mut PgConnection,
) -> Result<bool> {
    let done = sql::q(&stmts.cancel_timer)
        .bind(queue)
        .bind(timer_id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub(crate) async fn fetch_unprocessed_pg(
    stmts: &Statements,
    queue: Option<&str>,
    limit: i64,
    conn: &mut PgConnection,
) -> Result<Vec<OutboxRow>> {
    let rows = match queue {
        Some(q) => {
            sql::q_as::<OutboxRow>(&stmts.unprocessed_queue)
                .bind(q)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
        }
        None => {
            sql::q_as::<OutboxRow>(&stmts.unprocessed_all)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
        }
    };
    Ok(rows)
}
