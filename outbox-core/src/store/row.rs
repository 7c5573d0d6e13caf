//! A row of the outbox table as read back from the database.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::envelope::{self, Headers};
use crate::error::DecodeError;

/// One outbox row, all fourteen columns.
///
/// Returned by claims (inside a [`crate::Message`]) and by
/// [`fetch_unprocessed`](crate::OutboxBroker::fetch_unprocessed).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OutboxRow {
    /// Primary key (`BIGSERIAL`).
    pub id: i64,
    /// The queue the row was published to.
    pub queue: String,
    /// The encoded body.
    pub payload: Vec<u8>,
    /// The headers (always holding `correlation_id`, and `content-type` unless raw).
    pub headers: Headers,
    /// Recorded handler outcomes so far (incremented by each retry).
    pub attempts_count: i64,
    /// Claims so far, including lease-expiry reclaims.
    pub deliveries_count: i64,
    /// Insert time (database clock).
    pub created_at: DateTime<Utc>,
    /// Earliest time the row may be claimed.
    pub next_attempt_at: DateTime<Utc>,
    /// Time of the first recorded attempt.
    pub first_attempt_at: Option<DateTime<Utc>>,
    /// Time of the latest recorded attempt.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// When the current lease was taken, if leased.
    pub acquired_at: Option<DateTime<Utc>>,
    /// The current lease token, if leased.
    pub acquired_token: Option<Uuid>,
    /// The timer id, if the row was published with one.
    pub timer_id: Option<String>,
    /// The ordering key, if the row was published with one
    /// ([`PublishOptions::key`](crate::PublishOptions::key)).
    pub ordering_key: Option<String>,
}

/// The one decoder of an outbox row: by column name, from any statement that
/// returns the fourteen columns (`sql::ROW_COLUMNS`), as `query_as` uses it.
/// The headers column is read leniently (a value that is not a JSON object
/// is logged and read as no headers), so it is decoded by hand rather than
/// derived.
impl<'r> sqlx::FromRow<'r, PgRow> for OutboxRow {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let id: i64 = row.try_get("id")?;
        let headers = envelope::headers_column(row.try_get("headers")?, "outbox row", id);
        Ok(Self {
            id,
            queue: row.try_get("queue")?,
            payload: row.try_get("payload")?,
            headers,
            attempts_count: row.try_get("attempts_count")?,
            deliveries_count: row.try_get("deliveries_count")?,
            created_at: row.try_get("created_at")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            first_attempt_at: row.try_get("first_attempt_at")?,
            last_attempt_at: row.try_get("last_attempt_at")?,
            acquired_at: row.try_get("acquired_at")?,
            acquired_token: row.try_get("acquired_token")?,
            timer_id: row.try_get("timer_id")?,
            ordering_key: row.try_get("ordering_key")?,
        })
    }
}

impl OutboxRow {
    /// The `content-type` header, if any.
    pub fn content_type(&self) -> Option<&str> {
        envelope::content_type(&self.headers)
    }

    /// The correlation id: the `correlation_id` header, else the row id.
    pub fn correlation_id(&self) -> String {
        envelope::correlation_id_or(&self.headers, self.id)
    }

    /// Decodes the payload into `T` following its content type (see
    /// [`envelope::decode`]); the error names the row, queue and target type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        envelope::decode_stored(&self.payload, &self.headers, "row", self.id, &self.queue)
    }
}
