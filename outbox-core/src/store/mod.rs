//! The storage layer: the outbox and dead-letter tables and every statement
//! that runs on them. It depends on nothing above it (only
//! [`error`](crate::error), [`envelope`](crate::envelope) and external
//! crates); the producer side (`publish`, `broker`), the engine and `ops` are
//! built on it.
//!
//! - [`table`]: the table definitions ([`OutboxTable`], [`DlqTable`]), their
//!   DDL and migration; [`ident`]: identifier validation and quoting;
//! - [`sql`]: the statements, built once per table ([`sql::Statements`]);
//! - [`schema`]: schema-drift checks of the live tables ([`SchemaChecks`]);
//!   [`autovacuum`]: the autovacuum tuning DDL;
//! - [`row`] and [`dead_letter`]: rows read back ([`OutboxRow`],
//!   [`DeadLetter`]);
//! - [`producer`]: the validated rows a publish inserts, and the producer's
//!   statements on PostgreSQL;
//! - [`conn`]: the engine's seam, a connection ([`conn::Conn`]: PostgreSQL,
//!   or the in-memory store) and the lease-guarded statements;
//! - [`stats`]: per-queue counts ([`QueueStats`]); [`overview`]: the capped
//!   counts, activity, connection and row-lookup statements of the overview;
//! - [`source`]: the table's source identity (cluster, database, schema,
//!   table), read once at startup for bus-side deduplication ids;
//! - `memory` and `clock` (feature `testing`): the in-memory backend
//!   (`MemoryStore`) and its clock (`TestClock`).

pub(crate) mod autovacuum;
#[cfg(feature = "testing")]
pub(crate) mod clock;
pub(crate) mod conn;
pub(crate) mod dead_letter;
pub(crate) mod ident;
pub(crate) mod lane;
#[cfg(feature = "testing")]
pub(crate) mod memory;
pub(crate) mod overview;
pub(crate) mod producer;
pub(crate) mod row;
pub(crate) mod schema;
pub(crate) mod source;
pub(crate) mod sql;
pub(crate) mod stats;
pub(crate) mod table;

pub use autovacuum::{AutovacuumOptions, autovacuum_sql};
pub use dead_letter::{DeadLetter, FailureReason};
pub use row::OutboxRow;
pub use schema::SchemaChecks;
pub use stats::QueueStats;
pub use table::{DLQ_COLUMNS, DlqTable, OUTBOX_COLUMNS, OutboxTable};
