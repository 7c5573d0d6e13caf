//! A row of the dead-letter table as read back from the database.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::envelope::{self, Headers};
use crate::error::DecodeError;

/// One row of the dead-letter table, all twelve columns.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Primary key of the dead-letter row (what `dlq show`, `--ids` and
    /// [`DlqFilter::ids`](crate::ops::DlqFilter::ids) refer to).
    pub id: i64,
    /// The id the row had in the outbox.
    pub original_id: i64,
    /// The queue the row was published to.
    pub queue: String,
    /// The encoded body, as it was in the outbox.
    pub payload: Vec<u8>,
    /// The headers, as they were in the outbox.
    pub headers: Headers,
    /// Claims of the row before it failed for good.
    pub deliveries_count: i64,
    /// When the row was inserted into the outbox.
    pub created_at: DateTime<Utc>,
    /// When it was moved to the dead-letter table.
    pub failed_at: DateTime<Utc>,
    /// `max_deliveries`, `retry_terminal` or `rejected` (see
    /// [`FailureReason`](crate::FailureReason)); other writers may store other text.
    pub failure_reason: String,
    /// The rendered last error, if any (capped at 8 KiB by the engine).
    pub last_exception: Option<String>,
    /// The timer id, if the row was published with one.
    pub timer_id: Option<String>,
    /// The ordering key, if the row was published with one (a replay
    /// publishes it again with it).
    pub ordering_key: Option<String>,
}

/// The dead-letter columns its [`FromRow`](sqlx::FromRow) decoder reads
/// (alias `d`).
pub(crate) const DLQ_SELECT: &str = "d.id, d.original_id, d.queue, d.payload, d.headers, d.deliveries_count, \
     d.created_at, d.failed_at, d.failure_reason, d.last_exception, d.timer_id, d.ordering_key";

/// The one decoder of a dead letter: by column name (the columns of
/// `DLQ_SELECT`), as `query_as` uses it. The headers column is read
/// leniently, as an outbox row's, so it is decoded by hand rather than
/// derived.
impl<'r> sqlx::FromRow<'r, PgRow> for DeadLetter {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let id: i64 = row.try_get("id")?;
        let headers = envelope::headers_column(row.try_get("headers")?, "dead letter", id);
        Ok(Self {
            id,
            original_id: row.try_get("original_id")?,
            queue: row.try_get("queue")?,
            payload: row.try_get("payload")?,
            headers,
            deliveries_count: row.try_get("deliveries_count")?,
            created_at: row.try_get("created_at")?,
            failed_at: row.try_get("failed_at")?,
            failure_reason: row.try_get("failure_reason")?,
            last_exception: row.try_get("last_exception")?,
            timer_id: row.try_get("timer_id")?,
            ordering_key: row.try_get("ordering_key")?,
        })
    }
}

impl DeadLetter {
    /// The `content-type` header, if any.
    pub fn content_type(&self) -> Option<&str> {
        envelope::content_type(&self.headers)
    }

    /// The correlation id: the `correlation_id` header, else the original row
    /// id (what the handler saw as its correlation id).
    pub fn correlation_id(&self) -> String {
        envelope::correlation_id_or(&self.headers, self.original_id)
    }

    /// Decodes the payload into `T` following its content type (see
    /// [`envelope::decode`]); the error names the dead letter's id, its queue
    /// and the target type.
    pub fn decode<T: DeserializeOwned>(&self) -> crate::error::Result<T, DecodeError> {
        envelope::decode_stored(
            &self.payload,
            &self.headers,
            "dead letter",
            self.id,
            &self.queue,
        )
    }
}

/// Why a row left the outbox without being acknowledged. Stored verbatim in
/// the dead-letter table's `failure_reason` column (a public contract shared
/// with faststream-outbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureReason {
    /// The row was claimed more than `max_deliveries` times; the handler did
    /// not run.
    MaxDeliveries,
    /// The retry strategy gave up (or failed).
    RetryTerminal,
    /// The handler rejected the row (`reject()`, `RejectOnError`, or a
    /// `Manual` handler that returned without deciding).
    Rejected,
}

impl FailureReason {
    /// `max_deliveries`, `retry_terminal` or `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::MaxDeliveries => "max_deliveries",
            FailureReason::RetryTerminal => "retry_terminal",
            FailureReason::Rejected => "rejected",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
