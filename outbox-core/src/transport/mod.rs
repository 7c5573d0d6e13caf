//! [`Transport`]: where handlers' results go (Kafka, RabbitMQ, NATS, …);
//! [`TransportBroker`], how a transport crate connects and registers one
//! (`App::new(outbox).on_startup(kafka.connect())`); and [`MemoryTransport`],
//! an in-process transport that captures what it gets.
//!
//! `docs/transports.md` explains how to write a transport crate, and the
//! `outbox-conformance` crate checks one against its real server.

// This file: the `Transport` trait, the `Outgoing` message a transport
// receives and `BusRejection`, a bus's permanent refusal. `connect.rs`:
// `TransportBroker` (a transport's builder: name + connect) and `Connect`,
// its startup step (the App registers what it connects). `memory.rs`:
// `MemoryTransport`; `outbox.rs`: `OutboxTransport`, whose destinations are
// queues of an outbox (public at the crate root only, as before).
// Transports sit above the producer side (`OutboxTransport` publishes through
// an `OutboxBroker`) and below the engine and the App: they depend on
// neither.

mod connect;
pub(crate) mod lane;
mod memory;
pub(crate) mod outbox;
mod server;

use std::fmt;
use std::sync::Arc;

use crate::envelope::Headers;
use crate::error::BoxError;
pub use connect::{Connect, ConnectError, TransportBroker};
/// The boxed future [`Transport`] and [`TransportBroker`] methods return.
pub use futures_util::future::BoxFuture;
pub use lane::{Lane, LaneId, Lanes, LotOutcome, Opened};
pub use memory::{InjectedFailure, MemoryTransport};
pub use server::ServerInfo;

/// The argument of [`Transport::takes_follow_on`]: a type other crates
/// cannot name, so only this crate's transports can say yes.
mod sealed {
    /// See the module.
    #[derive(Debug)]
    pub struct Sealed;
}
pub(crate) use sealed::Sealed;

/// The header names the runtime sets on every [`Outgoing`] message besides
/// the envelope's (`content-type`, `correlation_id`). Their public path is
/// the crate root (`outbox_core::OUTBOX_ID`).
pub(crate) mod headers {
    /// The header carrying the outbox row id on published messages, for
    /// consumer-side deduplication.
    pub const OUTBOX_ID: &str = "outbox-id";
}

/// A message on its way to a bus: the handler's encoded result plus the
/// headers the runtime assembled (content type, correlation id, `outbox-id`,
/// explicit and propagated headers).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outgoing {
    /// Topic, exchange, subject, stream… as named in `#[publish_to]`.
    pub destination: String,
    /// Partitioning / routing key, if the handler gave one.
    pub key: Option<Vec<u8>>,
    /// The encoded body.
    pub payload: Vec<u8>,
    /// Headers, all strings.
    pub headers: Headers,
    /// The **source identity** of the outbox table the message came from,
    /// resolved once when `App::run` starts
    /// ([`OutboxBroker::resolve_source`](crate::OutboxBroker::resolve_source)):
    /// `<system_identifier>/<database oid>/<schema>.<table>` read from
    /// PostgreSQL, the explicit
    /// [`OutboxBroker::source_id`](crate::OutboxBroker::source_id), or
    /// `memory/<table>` in the test harness. `None` for messages not built
    /// by the App ([`Outgoing::new`]).
    ///
    /// What it is for: the `outbox-id` header is unique within **one**
    /// outbox table only. Two tables (two services, databases or schemas)
    /// publishing to one bus produce the same ids, so a transport whose bus
    /// deduplicates on an id (NATS JetStream's `Nats-Msg-Id`) must build that
    /// id from this source **and** the outbox id (`outbox-nats`:
    /// `<source>:<outbox-id>`); the outbox id alone makes the bus drop one
    /// table's message as a duplicate of the other's, while its row is
    /// deleted. One line of text (control characters are percent-encoded).
    /// It is not sent as a header by the runtime.
    pub source: Option<Arc<str>>,
    /// The outbox-only options of the result (`Response::activate_in`, …):
    /// only an [`OutboxTransport`](crate::OutboxTransport) takes them; the
    /// App refuses to send a message that has any to another transport.
    pub(crate) follow_on: outbox::FollowOn,
}

impl Outgoing {
    /// An outgoing message (for transport tests).
    pub fn new(destination: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            destination: destination.into(),
            key: None,
            payload,
            headers: Headers::new(),
            source: None,
            follow_on: outbox::FollowOn::default(),
        }
    }

    /// This message with [`source`](Self::source) set (for transport tests;
    /// the App sets it itself).
    ///
    /// ```
    /// use outbox_core::Outgoing;
    ///
    /// let m = Outgoing::new("orders", b"1".to_vec()).with_source("orders-service");
    /// assert_eq!(m.source.as_deref(), Some("orders-service"));
    /// ```
    pub fn with_source(mut self, source: impl Into<Arc<str>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The `content-type` header, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .get(crate::envelope::CONTENT_TYPE)
            .map(String::as_str)
    }
}

/// A bus's refusal that retrying cannot fix: the record is larger than the
/// bus accepts, the relay is not authorized for the destination, the
/// destination name is invalid, and so on.
///
/// A [`Transport`] returns it (boxed) from [`Transport::publish`] for such
/// refusals, with the bus's own error as its source. A subscriber that keeps
/// the default retry strategy then moves the row to the dead-letter table at
/// once (reason `rejected`, `last_exception` naming the bus and its error
/// text) instead of retrying for minutes; a subscriber with its own
/// [`RetryStrategy`](crate::RetryStrategy) decides itself (see
/// [`RetryContext::is_bus_rejection`](crate::retry::RetryContext::is_bus_rejection)).
/// Transient failures (timeouts, a broker that is down) must not use it.
///
/// ```
/// use outbox_core::transport::BusRejection;
///
/// let err = BusRejection::new("kafka", "Broker: Message size too large");
/// assert_eq!(err.bus(), "kafka");
/// assert_eq!(
///     err.to_string(),
///     "kafka refused the message, and retrying cannot change that"
/// );
/// let boxed: outbox_core::BoxError = Box::new(err);
/// assert!(BusRejection::find(&*boxed).is_some());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{bus} refused the message, and retrying cannot change that")]
pub struct BusRejection {
    bus: String,
    #[source]
    source: BoxError,
}

impl BusRejection {
    /// A permanent refusal by `bus` (a transport name such as `kafka`),
    /// caused by `source` (the bus's own error).
    pub fn new(bus: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            bus: bus.into(),
            source: source.into(),
        }
    }

    /// The bus that refused the message.
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// The first `BusRejection` in `err` or its chain of sources.
    pub fn find<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a BusRejection> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<BusRejection>() {
                return Some(r);
            }
            cur = e.source();
        }
        None
    }
}

/// A bus the runtime forwards handler results to.
///
/// Implementations live in their own crates (`outbox-kafka`, …) and depend on
/// `outbox-core` only. [`publish`](Self::publish) must resolve only once the bus
/// has confirmed the message (for Kafka: a positive delivery report): the
/// outbox row is deleted right after, so an early `Ok` would lose messages.
/// Many publishes are in flight at once (one per worker), so the future must
/// not hold a lock across the confirmation wait.
pub trait Transport: Send + Sync + 'static {
    /// The name handlers use in `#[publish_to(name, "destination")]`.
    fn name(&self) -> &str;

    /// Sends `msg`; resolves when the bus confirmed it, or with the error.
    fn publish(&self, msg: Outgoing) -> BoxFuture<'static, Result<(), BoxError>>;

    /// The longest a [`publish`](Self::publish) may wait for the bus (for
    /// Kafka, `message.timeout.ms`), if bounded. `App::run` warns when a
    /// subscriber's `lease_ttl` is not longer: the lease is not extended while
    /// a publish waits, so the row could be claimed and published again.
    fn max_publish_time(&self) -> Option<std::time::Duration> {
        None
    }

    /// Checks a destination named in `#[publish_to(name, "destination")]`
    /// (a topic name, a queue name…) when `App::run` starts, before anything
    /// is consumed; `Err(reason)` makes startup fail with it, naming the
    /// handler. The default accepts every destination.
    fn check_destination(&self, destination: &str) -> Result<(), String> {
        let _ = destination;
        Ok(())
    }

    /// Checks on the bus, when `App::run` starts (after the startup hooks
    /// connected the transports, before anything is consumed), that a
    /// destination named in `#[publish_to(name, "destination")]` exists and
    /// can take messages: a RabbitMQ exchange or queue, a JetStream stream
    /// capturing the subject, a Redis key of the right type. `Err(reason)`
    /// fails startup, naming the handler, the destination and the
    /// transport; the reason should say how to fix it (which `ensure_*`
    /// creates it). The default accepts every destination (a bus that
    /// creates destinations on first use, or cannot tell).
    ///
    /// The check must be bounded in time (the transport's connect or
    /// publish timeout). It is called once per distinct destination. What
    /// it cannot know (a RabbitMQ binding that routes the message) stays a
    /// publish error, retried and then dead-lettered.
    fn verify_destination(&self, destination: &str) -> BoxFuture<'static, Result<(), String>> {
        let _ = destination;
        Box::pin(async { Ok(()) })
    }

    /// Where the bus is (host, protocol; never credentials), for the
    /// `servers` of the AsyncAPI document (`App::asyncapi`). Default: none.
    fn server(&self) -> Option<ServerInfo> {
        None
    }

    /// Whether the transport can reach its bus now, for health probes
    /// (`AppHandle::health`, the `/readyz` endpoint of
    /// `App::health_endpoint`): `Err(reason)` says what is wrong in words
    /// (it is shown in the probe's JSON body). Probes call it every few
    /// seconds: it must be cheap and bounded in time (a few seconds; the
    /// caller also cuts it off). The default answers `Ok` (a transport that
    /// cannot tell).
    fn health(&self) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the transport takes the outbox-only options of a result
    /// (`Response::activate_in`, `activate_at`, `timer_id`,
    /// `timer_conflict`): only [`OutboxTransport`](crate::OutboxTransport)
    /// does. Not for other implementations (its argument cannot be named
    /// outside this crate).
    #[doc(hidden)]
    fn takes_follow_on(&self, _: Sealed) -> bool {
        false
    }

    /// The transport's exactly-once lanes, if it has them (Kafka with
    /// `KafkaBroker::transactional`): what a route with
    /// `exactly_once(lanes)` publishes through (see [`Lanes`] and
    /// `docs/exactly-once.md`). The default has none; `App::run` then
    /// refuses such a route.
    fn lanes(&self) -> Option<Arc<dyn Lanes>> {
        None
    }

    /// Flushes and closes; called once at shutdown, after the subscribers
    /// have drained.
    fn close(&self) -> BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async { Ok(()) })
    }
}

impl fmt::Debug for dyn Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Transport({:?})", self.name())
    }
}
