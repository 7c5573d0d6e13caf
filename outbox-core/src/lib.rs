//! # outbox-core
//!
//! A transactional outbox for PostgreSQL, compatible with the Python package
//! faststream-outbox 0.19 (same table, same envelope).
//!
//! A service writes its domain row and an outbox row in **one** transaction
//! ([`OutboxBroker::publish`] on `&mut *tx`). A relay claims committed rows with a
//! lease, runs a handler, and deletes the row only once the handler's outcome is
//! recorded: at-least-once delivery that survives crashes of the process and of
//! the database.

mod broker;
pub mod envelope;
mod error;
mod ident;
mod publish;
mod row;
mod sql;
mod table;

pub use broker::{DEFAULT_GRACEFUL_TIMEOUT, ErrorRenderer, OutboxBroker};
pub use envelope::{Headers, Raw};
pub use error::{BoxError, DecodeError, Error, Result};
pub use publish::{MAX_NAME_CHARS, PublishOptions, TimerConflict};
pub use row::OutboxRow;
pub use table::{DLQ_COLUMNS, DlqTable, OUTBOX_COLUMNS, OutboxTable};
