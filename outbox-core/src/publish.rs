//! The producer side: publishing rows on the caller's transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use crate::envelope::{self, Headers};
use crate::error::{Error, Result};
use crate::row::OutboxRow;
use crate::sql::{self, ScheduleKind, Statements, TimerKind};

/// Longest queue name or timer id, in characters (the columns are `VARCHAR(255)`).
pub const MAX_NAME_CHARS: usize = 255;

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

/// Options of a single publish (and, for the subset that applies, of a batch).
///
/// ```
/// use std::time::Duration;
/// use outbox_core::{PublishOptions, TimerConflict};
///
/// let opts = PublishOptions::new()
///     .header("x-tenant", "acme")
///     .correlation_id("req-42")
///     .activate_in(Duration::from_secs(30))
///     .timer_id("order-7-reminder")
///     .timer_conflict(TimerConflict::Extend);
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishOptions {
    headers: Headers,
    correlation_id: Option<String>,
    activate_in: Option<Duration>,
    activate_at: Option<DateTime<Utc>>,
    timer_id: Option<String>,
    timer_conflict: TimerConflict,
}

impl PublishOptions {
    /// No headers, immediate delivery, no timer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one header (`content-type` and `correlation_id` are managed by the
    /// envelope; setting them is allowed only if they agree with it).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Adds several headers.
    pub fn headers<K, V>(mut self, headers: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.headers
            .extend(headers.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Sets the correlation id (default: the `correlation_id` header, else a new UUID).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Delays eligibility by `delay`, measured on the database clock
    /// (`now() + delay`), so it is immune to clock skew between hosts.
    pub fn activate_in(mut self, delay: Duration) -> Self {
        self.activate_in = Some(delay);
        self
    }

    /// Makes the row eligible at `at` (stored as given).
    pub fn activate_at(mut self, at: DateTime<Utc>) -> Self {
        self.activate_at = Some(at);
        self
    }

    /// Names a timer: at most one live row per `(queue, timer_id)`.
    pub fn timer_id(mut self, id: impl Into<String>) -> Self {
        self.timer_id = Some(id.into());
        self
    }

    /// What to do when the timer already exists (default [`TimerConflict::Ignore`]).
    pub fn timer_conflict(mut self, mode: TimerConflict) -> Self {
        self.timer_conflict = mode;
        self
    }

    /// The headers set so far.
    pub fn get_headers(&self) -> &Headers {
        &self.headers
    }

    fn schedule(&self) -> Result<Schedule> {
        match (self.activate_in, self.activate_at) {
            (Some(_), Some(_)) => Err(Error::arg(
                "publish accepts at most one of activate_in / activate_at; set only one",
            )),
            (Some(d), None) => Ok(Schedule::In(d)),
            (None, Some(at)) => Ok(Schedule::At(at)),
            (None, None) => Ok(Schedule::Now),
        }
    }

    fn validate_single(&self) -> Result<Schedule> {
        let schedule = self.schedule()?;
        if let Some(id) = &self.timer_id {
            validate_name("timer_id", id)?;
        }
        if self.timer_conflict != TimerConflict::Ignore && self.timer_id.is_none() {
            return Err(Error::arg(
                "timer_conflict Extend requires a timer_id; set .timer_id(..) or drop .timer_conflict(..)",
            ));
        }
        Ok(schedule)
    }

    fn validate_batch(&self) -> Result<Schedule> {
        if self.timer_id.is_some() || self.correlation_id.is_some() {
            return Err(Error::arg(
                "timer_id / correlation_id are not supported for batch publishes (each row gets \
                 its own correlation id); publish those rows one by one",
            ));
        }
        if self.timer_conflict != TimerConflict::Ignore {
            return Err(Error::arg(
                "timer_conflict is not supported for batch publishes (they cannot carry a timer_id)",
            ));
        }
        self.schedule()
    }
}

/// Validates a queue name (also used by subscribers).
pub(crate) fn validate_queue(queue: &str) -> Result<()> {
    validate_name("queue", queue)
}

fn validate_name(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::arg(format!("{what} must be a non-empty string")));
    }
    let n = value.chars().count();
    if n > MAX_NAME_CHARS {
        return Err(Error::arg(format!(
            "{what} must be at most {MAX_NAME_CHARS} characters (got {n})"
        )));
    }
    Ok(())
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

// ---------------------------------------------------------------------------
// Validation and encoding, shared by every storage backend.
// ---------------------------------------------------------------------------

/// One validated, encoded row, ready for the storage backend: what a single
/// publish inserts. Built by [`prepare`] only, so every backend sees rows
/// that passed the same checks.
#[derive(Debug, Clone)]
pub(crate) struct Insert {
    pub(crate) queue: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Headers,
    pub(crate) schedule: Schedule,
    /// The timer id and what to do on a conflict.
    pub(crate) timer: Option<(String, TimerConflict)>,
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
    pub(crate) notify: bool,
}

/// Validates a single publish and encodes its body and headers.
pub(crate) fn prepare<T: Serialize + ?Sized>(
    body: &T,
    queue: &str,
    opts: &PublishOptions,
) -> Result<Insert> {
    let schedule = opts.validate_single()?;
    validate_queue(queue)?;
    #[allow(unused_mut)]
    let mut user_headers = opts.headers.clone();
    #[cfg(feature = "otel")]
    crate::otel::inject_current(&mut user_headers);
    let (payload, headers) = envelope::encode(body, user_headers, opts.correlation_id.as_deref())?;
    Ok(Insert {
        queue: queue.to_owned(),
        payload,
        headers,
        schedule,
        timer: opts.timer_id.clone().map(|id| (id, opts.timer_conflict)),
        notify: true,
    })
}

/// Validates a batch publish and encodes every body (each row gets its own
/// correlation id).
pub(crate) fn prepare_batch<T, I>(
    bodies: I,
    queue: &str,
    opts: &PublishOptions,
) -> Result<BatchInsert>
where
    I: IntoIterator<Item = T>,
    T: Serialize,
{
    let schedule = opts.validate_batch()?;
    validate_queue(queue)?;
    let mut payloads = Vec::new();
    let mut headers = Vec::new();
    #[allow(unused_mut)]
    let mut shared = opts.headers.clone();
    #[cfg(feature = "otel")]
    crate::otel::inject_current(&mut shared);
    for body in bodies {
        let (p, h) = envelope::encode(&body, shared.clone(), None)?;
        payloads.push(p);
        headers.push(h);
    }
    Ok(BatchInsert {
        queue: queue.to_owned(),
        payloads,
        headers,
        schedule,
        notify: true,
    })
}

/// Validates the arguments of a timer cancellation.
pub(crate) fn validate_cancel(queue: &str, timer_id: &str) -> Result<()> {
    validate_queue(queue)?;
    validate_name("timer_id", timer_id)
}

/// Validates the arguments of an inspection read.
pub(crate) fn validate_unprocessed(queue: Option<&str>, limit: i64) -> Result<()> {
    if limit < 1 {
        return Err(Error::arg(format!("limit must be >= 1, got {limit}")));
    }
    if let Some(q) = queue {
        validate_queue(q)?;
    }
    Ok(())
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
    let mut query = sql::q(stmts.insert(schedule_kind(insert.schedule), timer, notify))
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
    let mut query = sql::q(stmts.insert_batch(schedule_kind(batch.schedule), notify))
        .bind(batch.queue)
        .bind(batch.payloads)
        .bind(headers);
    match batch.schedule {
        Schedule::Now => {}
        Schedule::In(d) => query = query.bind(duration_secs(d)),
        Schedule::At(at) => query = query.bind(at),
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
            sql::q(&stmts.unprocessed_queue)
                .bind(q)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
        }
        None => {
            sql::q(&stmts.unprocessed_all)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
        }
    };
    rows.iter()
        .map(|r| OutboxRow::from_pg(r).map_err(Error::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_activations_are_refused() {
        let opts = PublishOptions::new()
            .activate_in(Duration::from_secs(1))
            .activate_at(Utc::now());
        let err = opts.validate_single().unwrap_err().to_string();
        assert!(
            err.contains("at most one of activate_in / activate_at"),
            "{err}"
        );
        let err = opts.validate_batch().unwrap_err().to_string();
        assert!(
            err.contains("at most one of activate_in / activate_at"),
            "{err}"
        );
    }

    #[test]
    fn extend_needs_a_timer() {
        let err = PublishOptions::new()
            .timer_conflict(TimerConflict::Extend)
            .validate_single()
            .unwrap_err()
            .to_string();
        assert!(err.contains("requires a timer_id"), "{err}");
    }

    #[test]
    fn names_are_bounded_in_characters() {
        assert!(validate_queue(&"é".repeat(255)).is_ok());
        let err = validate_queue(&"q".repeat(256)).unwrap_err().to_string();
        assert_eq!(err, "queue must be at most 255 characters (got 256)");
        let err = validate_queue("").unwrap_err().to_string();
        assert_eq!(err, "queue must be a non-empty string");
        let err = PublishOptions::new()
            .timer_id("t".repeat(256))
            .validate_single()
            .unwrap_err()
            .to_string();
        assert_eq!(err, "timer_id must be at most 255 characters (got 256)");
    }

    #[test]
    fn batches_refuse_per_row_options() {
        for opts in [
            PublishOptions::new().timer_id("t"),
            PublishOptions::new().correlation_id("c"),
        ] {
            let err = opts.validate_batch().unwrap_err().to_string();
            assert!(err.contains("not supported for batch publishes"), "{err}");
        }
    }
}
