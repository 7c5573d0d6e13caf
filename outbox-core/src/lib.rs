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

mod app;
mod broker;
mod engine;
pub mod envelope;
mod error;
pub mod ops;
#[cfg(feature = "otel")]
pub mod otel;
mod publish;
mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;

pub use app::{
    App, AppContext, AppHandle, FromDelivery, Hook, IntoHook, IntoReply, IntoRoute, Location,
    PublishTarget, Reply, Requirement, Response, Route, RouteBuilder, RouteCall, State,
};
pub use broker::{DEFAULT_GRACEFUL_TIMEOUT, ErrorRenderer, OutboxBroker};
pub use engine::handler::{Handler, IntoHandlerResult};
pub use engine::message::{AckPolicy, FailureReason, Message, Outcome};
pub use engine::retry;
pub use engine::retry::RetryStrategy;
pub use engine::subscriber::{
    KnobDefaults, RELAY_DEFAULTS, SUBSCRIBER_DEFAULTS, Subscriber, SubscriberBuilder,
    SubscriberOptions,
};
pub use engine::{DEFAULT_GAUGE_INTERVAL, Engine, LAST_EXCEPTION_MAX_CHARS, StopReport};
pub use envelope::{Headers, Passthrough, Raw};
pub use error::{BoxError, DecodeError, Error, Result};
pub use publish::{MAX_NAME_CHARS, PublishOptions};
pub use store::producer::TimerConflict;
pub use store::{
    DLQ_COLUMNS, DlqTable, OUTBOX_COLUMNS, OutboxRow, OutboxTable, SchemaChecks, SchemaDrift,
};
pub use transport::headers::OUTBOX_ID;
pub use transport::outbox::{OUTBOX_TRANSPORT, OutboxTransport};
pub use transport::{BusRejection, MemoryTransport, Outgoing, Transport};

#[cfg(feature = "macros")]
pub use outbox_macros::{publish_to, subscriber};

/// The `sqlx` this crate is built with: use `outbox_core::sqlx::PgPool` (or
/// depend on the same `sqlx` version) so that your pool and transactions are
/// the types `publish` takes.
pub use sqlx;

// Not public API. Used by generated code and by the workspace's tests.
#[doc(hidden)]
pub mod __private {
    pub use crate::app::RouteFactory;
    pub use futures_util::future::BoxFuture;
    pub use inventory;

    /// Identity with an `IntoReply` bound, emitted at the span of a handler's
    /// return type so an unserializable result is reported there.
    pub fn reply<R: crate::IntoReply>(r: R) -> R {
        r
    }

    /// `FromDelivery` for one handler parameter, emitted at the span of the
    /// parameter's type.
    pub fn extract<T: crate::FromDelivery>(
        msg: &crate::Message,
        ctx: &crate::AppContext,
    ) -> Result<T, crate::BoxError> {
        T::from_delivery(msg, ctx)
    }

    /// One of the engine's statements for `table` (`claim`, `ack`,
    /// `ack_batch`, `retry`, `release`), for EXPLAIN tests.
    pub fn engine_sql(table: &crate::OutboxTable, which: &str) -> Option<String> {
        let s = crate::store::sql::Statements::new(table, None, false);
        let sql = match which {
            "claim" => &s.claim,
            "claim_pending" => &s.claim_pending,
            "ack" => &s.ack,
            "ack_batch" => &s.ack_batch,
            "retry" => &s.retry,
            "release" => &s.release,
            _ => return None,
        };
        Some(sql.to_string())
    }
}
