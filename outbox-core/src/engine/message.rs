//! What a handler receives ([`Message`]) and what the engine records for each
//! delivery ([`Outcome`]).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::envelope::{Headers, Passthrough};
use crate::error::DecodeError;
use crate::store::OutboxRow;
use crate::transport::outbox::Staged;

pub use crate::store::FailureReason;

/// The one outcome recorded for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Handled: the row is deleted.
    Ack,
    /// Try again after `delay` (database clock); the lease is released and
    /// `attempts_count` incremented.
    Retry {
        /// The delay before the next attempt.
        delay: Duration,
    },
    /// Failed for good: the row is deleted, or moved to the dead-letter table
    /// in the same statement when one is configured.
    Terminal {
        /// Why.
        reason: FailureReason,
    },
}

/// How a handler's result turns into an [`Outcome`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AckPolicy {
    /// Success acks; an error (or panic) is handed to the retry strategy.
    #[default]
    NackOnError,
    /// Success acks; an error (or panic) is terminal (`rejected`), whatever the
    /// retry strategy.
    RejectOnError,
    /// The handler decides with [`Message::ack`], [`Message::nack`] or
    /// [`Message::reject`]. An error without a decision is a nack (retried).
    ///
    /// **A handler that returns `Ok` without deciding rejects the row**: it is
    /// deleted (or dead-lettered as `rejected`). This mirrors faststream-outbox
    /// and is logged at ERROR; always decide explicitly under `Manual`.
    Manual,
}

/// A decision a handler took through its [`Message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Ack,
    Nack,
    Reject,
}

pub(crate) struct Delivery {
    pub(crate) row: OutboxRow,
    pub(crate) token: Uuid,
    pub(crate) claimed_at: Instant,
    decision: Mutex<Option<Decision>>,
    /// The follow-on rows its handler's result staged (queue chaining):
    /// written with the ack, dropped with any other outcome.
    chained: Mutex<Vec<Staged>>,
}

impl Delivery {
    pub(crate) fn new(row: OutboxRow, token: Uuid) -> Self {
        Self {
            row,
            token,
            claimed_at: Instant::now(),
            decision: Mutex::new(None),
            chained: Mutex::new(Vec::new()),
        }
    }

    /// Keeps the follow-on rows the handler's result staged.
    pub(crate) fn set_chained(&self, rows: Vec<Staged>) {
        *self.chained.lock().unwrap_or_else(|p| p.into_inner()) = rows;
    }

    /// The staged follow-on rows (leaves none).
    pub(crate) fn take_chained(&self) -> Vec<Staged> {
        std::mem::take(&mut *self.chained.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn decision(&self) -> Option<Decision> {
        *self.decision.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn decide(&self, d: Decision) -> bool {
        let mut slot = self.decision.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(d);
        true
    }
}

/// A claimed row, as a handler sees it.
///
/// Cloning is cheap and every clone refers to the same delivery: the first
/// of [`ack`](Self::ack), [`nack`](Self::nack) and [`reject`](Self::reject) wins,
/// later calls are no-ops (they return `false`).
#[derive(Clone)]
pub struct Message {
    inner: Arc<Delivery>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.inner.row.id)
            .field("queue", &self.inner.row.queue)
            .field("deliveries_count", &self.inner.row.deliveries_count)
            .finish_non_exhaustive()
    }
}

impl Message {
    pub(crate) fn new(delivery: Arc<Delivery>) -> Self {
        Self { inner: delivery }
    }

    /// A message for a row that was not claimed by an engine (no lease): for
    /// unit tests of handlers and for in-memory harnesses.
    pub fn detached(row: OutboxRow) -> Self {
        let token = row.acquired_token.unwrap_or_else(Uuid::nil);
        Self::new(Arc::new(Delivery::new(row, token)))
    }

    /// The row id.
    pub fn id(&self) -> i64 {
        self.inner.row.id
    }

    /// The queue.
    pub fn queue(&self) -> &str {
        &self.inner.row.queue
    }

    /// The raw payload.
    pub fn payload(&self) -> &[u8] {
        &self.inner.row.payload
    }

    /// The headers (including `correlation_id` and, unless raw, `content-type`).
    pub fn headers(&self) -> &Headers {
        &self.inner.row.headers
    }

    /// One header.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.inner.row.headers.get(key).map(String::as_str)
    }

    /// The content type, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.inner.row.content_type()
    }

    /// The correlation id (the header, else the row id).
    pub fn correlation_id(&self) -> String {
        self.inner.row.correlation_id()
    }

    /// Claims so far, this one included.
    pub fn deliveries_count(&self) -> i64 {
        self.inner.row.deliveries_count
    }

    /// Recorded attempts before this one.
    pub fn attempts_count(&self) -> i64 {
        self.inner.row.attempts_count
    }

    /// When the row was published (database clock).
    pub fn created_at(&self) -> DateTime<Utc> {
        self.inner.row.created_at
    }

    /// The timer id, if any.
    pub fn timer_id(&self) -> Option<&str> {
        self.inner.row.timer_id.as_deref()
    }

    /// The row's ordering key, if it was published with one
    /// ([`PublishOptions::key`](crate::PublishOptions::key)).
    pub fn ordering_key(&self) -> Option<&str> {
        self.row().ordering_key.as_deref()
    }

    /// The whole row as claimed.
    pub fn row(&self) -> &OutboxRow {
        &self.inner.row
    }

    /// Decodes the payload into `T` (see [`crate::envelope::decode`]).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        self.inner.row.decode()
    }

    /// Acknowledges: the row will be deleted. Returns `false` if a decision was
    /// already taken.
    pub fn ack(&self) -> bool {
        self.inner.decide(Decision::Ack)
    }

    /// Negative acknowledgement: the retry strategy decides (with the
    /// handler's error, if it returns one). Returns `false` if a decision was
    /// already taken.
    pub fn nack(&self) -> bool {
        self.inner.decide(Decision::Nack)
    }

    /// Rejects: terminal failure with reason `rejected`. Returns `false` if a
    /// decision was already taken.
    pub fn reject(&self) -> bool {
        self.inner.decide(Decision::Reject)
    }
}

// `Passthrough` is the envelope's (a leaf module); building one from a
// delivered message belongs here, with the message.
impl Passthrough {
    /// The payload and content type of a delivered row, as stored (what a
    /// `Passthrough` handler parameter receives).
    ///
    /// ```
    /// use outbox_core::{Message, Passthrough};
    ///
    /// fn copy(msg: &Message) -> Passthrough {
    ///     let p = Passthrough::from_message(msg);
    ///     assert_eq!(p.payload(), msg.payload());
    ///     assert_eq!(p.content_type(), msg.content_type());
    ///     p
    /// }
    /// ```
    pub fn from_message(msg: &Message) -> Self {
        let p = Passthrough::new(msg.payload());
        match msg.content_type() {
            Some(ct) => p.with_content_type(ct),
            None => p,
        }
    }
}
