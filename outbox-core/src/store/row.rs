//! A row of the outbox table as read back from the database.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::envelope::{self, Headers};
use crate::error::DecodeError;

/// One outbox row, all thirteen columns.
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
}

impl OutboxRow {
    pub(crate) fn from_pg(row: &PgRow) -> Result<Self, sqlx::Error> {
        let id: i64 = row.try_get(0)?;
        let headers = envelope::headers_column(row.try_get(3)?, "outbox row", id);
        Ok(Self {
            id,
            queue: row.try_get(1)?,
            payload: row.try_get(2)?,
            headers,
            attempts_count: row.try_get(4)?,
            deliveries_count: row.try_get(5)?,
            created_at: row.try_get(6)?,
            next_attempt_at: row.try_get(7)?,
            first_attempt_at: row.try_get(8)?,
            last_attempt_at: row.try_get(9)?,
            acquired_at: row.try_get(10)?,
            acquired_token: row.try_get(11)?,
            timer_id: row.try_get(12)?,
        })
    }

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
