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
//!
//! # Module map
//!
//! Bottom layer first. A module uses only the ones listed in its row, which
//! are all below it: the dependencies point one way (`tests/layers.rs`
//! checks every `crate::` path against this table).
//!
//! | module | what it is | uses |
//! |---|---|---|
//! | `error` | [`Error`], [`DecodeError`], [`SchemaDrift`]: how every layer reports | (nothing) |
//! | [`envelope`] | body encoding and the headers a row carries | error |
//! | `otel` | W3C trace context in the headers (feature `otel`) | envelope |
//! | `instrument` | metric names and their recording (what every layer calls) | error |
//! | `store/` | the storage layer: [`OutboxTable`] / [`DlqTable`], identifiers, statements, schema checks, row decoding ([`OutboxRow`]), the engine's connection seam, the in-memory backend | error, envelope |
//! | [`inbox`] | [`Inbox`](inbox::Inbox): consumer-side deduplication in the consumer's own transaction | store |
//! | `publish` | validating and encoding publishes ([`PublishOptions`]) into the rows the store inserts | store, otel |
//! | `broker` | [`OutboxBroker`]: the handle producers publish through and the engine and `ops` run on | publish, store, instrument |
//! | `publisher` | [`OutboxPublisher`]: a publish handle bound to one queue with default options ([`OutboxBroker::publisher`]) | broker, publish |
//! | [`transport`] | [`Transport`], where handler results go, and [`TransportBroker`], the one way a transport registers (`kafka.connect()`); [`MemoryTransport`]; [`OutboxTransport`] | broker, publish |
//! | `engine/` | [`Engine`]: the relay (fetch loop, workers, acker, LISTEN, gauges) and the subscriber API it runs ([`Subscriber`], [`Message`], [`Handler`], [`retry`]) | transport, broker, publish, store, instrument, otel |
//! | [`ops`] | statistics, dead letters, replay, autovacuum DDL (what the CLI runs) | broker, publish, store |
//! | `app/` | [`App`]: routes, extractors, replies, hooks, transports and an engine wired together | all of the above |
//! | `testing` | `TestApp`, the test harness (feature `testing`) | everything |
//! | [`telemetry`] | the public face of the metrics: `instrument`'s names and the engine's one-shot [`sample_gauges`](telemetry::sample_gauges) under one path | instrument, engine |
//!
//! There is no exception. The test harness plugs in from above:
//! the broker's storage backend is a value (PostgreSQL, or the harness's
//! in-memory store), and the engine reports to the broker's observer, which
//! the harness implements; `broker` and `engine/` never name `testing`.
//!
//! # Glossary
//!
//! - **outbox row**: one row of the outbox table ([`OutboxRow`]): a message
//!   (payload and headers) published to a queue in the producer's
//!   transaction, deleted once it has been handled.
//! - **queue**: the name a row is published to (its `queue` column). All
//!   queues share one outbox table; a subscriber serves one or more of them.
//! - **subscriber**: a handler with the queues it serves and its options
//!   (workers, lease, retries, …): [`Subscriber`], or `#[subscriber]` on an
//!   `async fn`.
//! - **route**: a subscriber as an [`App`] registers it ([`Route`]): its
//!   handler's parameters are extracted from the delivery, and its result can
//!   be forwarded to a transport (`#[publish_to]`).
//! - **transport**: a bus the App forwards handler results to (Kafka, the
//!   in-process [`MemoryTransport`], another outbox): [`Transport`].
//! - **destination**: where a transport sends a result: a topic, exchange,
//!   subject or queue, as in `#[publish_to(kafka, "orders.kafka")]`.
//! - **lease**: a relay's claim on a row, a random token and `acquired_at`
//!   stamped by the claim. Every later write filters on the token; a lease
//!   older than `lease_ttl` has expired and the row can be claimed again.
//! - **relay**: a process running the engine: it claims rows, runs their
//!   handlers, forwards the results and deletes the rows.
//! - **ordering key**: what the rows of one aggregate share
//!   ([`PublishOptions::key`]); an **ordered** subscriber
//!   ([`SubscriberOptions::ordered`]) handles a key's rows one at a time, in
//!   commit order, claiming only each key's **head** (its oldest row); a
//!   [`PoisonPolicy`] says what a failing head does to its key.

// The modules; the map above gives their layers.
mod app;
mod broker;
mod engine;
pub mod envelope;
mod error;
pub mod inbox;
mod instrument;
pub mod ops;
#[cfg(feature = "otel")]
pub mod otel;
mod publish;
mod publisher;
mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;

pub use app::asyncapi;
pub use app::asyncapi::AsyncApi;
pub use app::health;
pub use app::{
    App, AppContext, AppHandle, FromDelivery, HandlerFn, Hook, IntoHook, IntoReply, IntoRoute,
    Location, MessageHeaders, PublishTarget, Reply, Requirement, Response, Route, RouteBuilder,
    RouteCall, ServiceStop, State,
};
pub use broker::{DEFAULT_GRACEFUL_TIMEOUT, ErrorRenderer, OutboxBroker};
pub use engine::handler::{Handler, IntoHandlerResult};
pub use engine::message::{AckPolicy, FailureReason, Message, Outcome};
pub use engine::retry;
pub use engine::retry::RetryStrategy;
pub use engine::subscriber::{
    ClaimMode, DEFAULT_LOTS, DEFAULT_MAX_HOLD, KnobDefaults, PoisonPolicy, RELAY_DEFAULTS,
    SUBSCRIBER_DEFAULTS, Subscriber, SubscriberBuilder, SubscriberOptions,
};
pub use engine::{DEFAULT_GAUGE_INTERVAL, Engine, LAST_EXCEPTION_MAX_CHARS, StopReport};
pub use envelope::{Headers, Passthrough, Raw};
pub use error::{BoxError, DecodeError, Error, Result, SchemaDrift, render_error_chain};
pub use publish::{MAX_NAME_CHARS, PublishOptions};
pub use publisher::OutboxPublisher;
pub use store::producer::TimerConflict;
pub use store::{DLQ_COLUMNS, DlqTable, OUTBOX_COLUMNS, OutboxRow, OutboxTable, SchemaChecks};
pub use transport::headers::OUTBOX_ID;
pub use transport::outbox::{OUTBOX_TRANSPORT, OutboxTransport};
pub use transport::{
    BusRejection, Connect, ConnectError, MemoryTransport, Outgoing, Transport, TransportBroker,
};

#[cfg(feature = "macros")]
pub use outbox_macros::{publish_to, subscriber};

/// The `sqlx` this crate is built with: use `outbox_core::sqlx::PgPool` (or
/// depend on the same `sqlx` version) so that your pool and transactions are
/// the types `publish` takes.
pub use sqlx;

/// The `schemars` the AsyncAPI payload schemas are built with (feature
/// `schemars`): derive `JsonSchema` on your payload types with it.
#[cfg(feature = "schemars")]
pub use schemars;

// Not public API. Used by generated code and by the workspace's tests.
#[doc(hidden)]
pub mod __private {
    pub use crate::app::asyncapi::{ProbeJsonSchema, ProbeNotBody, ProbePlaceholder, SchemaProbe};
    pub use crate::app::{ROUTE_OPTION_NAMES, RouteFactory};
    pub use crate::engine::subscriber::SUBSCRIBER_OPTION_NAMES;
    pub use futures_util::future::BoxFuture;
    pub use inventory;
    #[cfg(feature = "macros")]
    pub use outbox_macros::__subscriber_option_names;

    /// [`IntoReply::into_reply`](crate::IntoReply::into_reply), emitted at
    /// the span of a handler's return type so an unserializable result is
    /// reported there (and the route's handler returns a concrete type).
    pub fn reply<R: crate::IntoReply>(r: R) -> Result<Option<crate::Reply>, crate::BoxError> {
        r.into_reply()
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
            "extend" => &s.extend,
            "claim_ordered" => s.claim_ordered(true),
            "claim_ordered_pending" => s.claim_ordered(false),
            _ => return None,
        };
        Some(sql.to_string())
    }
}
