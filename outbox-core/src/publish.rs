//! The producer side: validating and encoding publishes into the rows the
//! storage layer inserts ([`Insert`], [`BatchInsert`]); the
//! [`OutboxBroker`](crate::OutboxBroker) runs them on the caller's
//! transaction (or the in-memory backend).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::envelope::{self, Headers};
use crate::error::{Error, Result};
use crate::store::producer::{BatchInsert, Insert, Schedule, TimerConflict};

/// Longest queue name or timer id, in characters (the columns are `VARCHAR(255)`).
pub const MAX_NAME_CHARS: usize = 255;

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
    key: Option<String>,
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

    /// Sets the row's **ordering key** (an order id, a user id: what the
    /// events of one aggregate share; 1 to 255 characters), stored in the
    /// `ordering_key` column. On a batch publish every row gets the key, in
    /// the batch's order.
    ///
    /// - An [`ordered`](crate::SubscriberOptions::ordered) subscriber hands
    ///   the rows of one key to its handler one at a time, in commit order.
    /// - A relay sends the key as the message key unless the handler's
    ///   [`Response::key`](crate::Response::key) sets another: the Kafka
    ///   record key (so the partition follows it), the `outbox-key` header on
    ///   the other buses.
    ///
    /// The publish first takes a transaction-scoped advisory lock on
    /// `(table, queue, key)`, held until your transaction ends: two
    /// transactions publishing the same key serialize, so the row ids of a
    /// key follow commit order. Publish a transaction's keys in a consistent
    /// order (or one key per transaction), as with row locks, to avoid
    /// deadlocks.
    ///
    /// ```
    /// use outbox_core::PublishOptions;
    ///
    /// let opts = PublishOptions::new().key("order-42");
    /// assert_eq!(opts.get_key(), Some("order-42"));
    /// ```
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The ordering key, if set.
    pub fn get_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The headers set so far.
    pub fn get_headers(&self) -> &Headers {
        &self.headers
    }

    /// These options over `defaults` (an [`OutboxPublisher`](crate::OutboxPublisher)'s):
    /// the headers of both, these winning on a shared name; the schedule
    /// (`activate_in` / `activate_at`), the key and the correlation id from
    /// these where set, else from `defaults`; the timer only from these.
    pub(crate) fn over(&self, defaults: &PublishOptions) -> PublishOptions {
        let mut headers = defaults.headers.clone();
        headers.extend(self.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let own_schedule = self.activate_in.is_some() || self.activate_at.is_some();
        let (activate_in, activate_at) = if own_schedule {
            (self.activate_in, self.activate_at)
        } else {
            (defaults.activate_in, defaults.activate_at)
        };
        PublishOptions {
            headers,
            correlation_id: self
                .correlation_id
                .clone()
                .or_else(|| defaults.correlation_id.clone()),
            activate_in,
            activate_at,
            timer_id: self.timer_id.clone(),
            timer_conflict: self.timer_conflict,
            key: self.key.clone().or_else(|| defaults.key.clone()),
        }
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

    fn validate_key(&self) -> Result<()> {
        match &self.key {
            Some(k) => validate_name("key", k),
            None => Ok(()),
        }
    }

    fn validate_single(&self) -> Result<Schedule> {
        let schedule = self.schedule()?;
        self.validate_key()?;
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
        self.validate_key()?;
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

// ---------------------------------------------------------------------------
// Validation and encoding, shared by every storage backend.
// ---------------------------------------------------------------------------

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
        key: opts.key.clone(),
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
        key: opts.key.clone(),
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
            .key("")
            .validate_single()
            .unwrap_err()
            .to_string();
        assert_eq!(err, "key must be a non-empty string");
        let err = PublishOptions::new()
            .key("k".repeat(256))
            .validate_batch()
            .unwrap_err()
            .to_string();
        assert_eq!(err, "key must be at most 255 characters (got 256)");
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
