// Module map. Each file uses only files listed above it, so dependencies point
// one way (no import cycle) and the list reads from the foundations up. The
// `layering` test (tests/layering.rs: outbox_conformance::layering) checks it
// against the code (`crate::` and `super::` paths, tests included), the
// `[uses ..]` lists too.
//
//   error.rs        the crate's one error enum and its classification (is_retryable)
//   config.rs       settings and defaults; the URL check; password redaction [uses error]
//   connection.rs   opening a connection within a timeout; what a broker's reply
//                   code means (ACCESS_REFUSED, NOT_FOUND, ...) [uses config, error]
//   destination.rs  the destination syntax (queue | exchange/routing-key) and
//                   AMQP's name rules; declaring queues, exchanges, bindings
//                   [uses config, connection, error]
//   transport.rs    RabbitTransport, the outbox_core::Transport impl: publish with
//                   mandatory + confirms, the one deadline, reconnecting,
//                   BusRejection, the startup check of destinations (passive
//                   declares), close [uses config, connection, destination, error]
//   broker.rs       RabbitBroker: the builder, its TransportBroker impl (connect()
//                   is outbox-core's shared registration step), ensure_queue,
//                   ensure_exchange, ensure_binding
//                   [uses config, destination, error, transport]
//   testing.rs      (feature testing) test_rabbit(), a capturing stand-in [uses config]
//   lib.rs          these docs and the re-exports: the public API
//
// In short (A <- B: B uses A): error <- config <- connection <- destination
// <- transport <- broker <- lib.

//! # outbox-rabbitmq
//!
//! The RabbitMQ transport of [`outbox_core`]: handler results of routes with
//! `#[publish_to(rabbit, "orders")]` become AMQP 0-9-1 messages, published
//! with [lapin](https://docs.rs/lapin) on a channel in confirm mode.
//!
//! ```no_run
//! use outbox_core::{App, BoxError, Message, OutboxBroker, Response, Route};
//! use outbox_rabbitmq::RabbitBroker;
//!
//! # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
//! let rabbit = RabbitBroker::new("amqp://guest:guest@127.0.0.1:5672/%2f");
//! let relay = Route::builder(["orders"])
//!     .publish_to("rabbit", "orders") // the queue `orders`, via the default exchange
//!     .handler(|msg: Message, _| async move {
//!         let order_id: i64 = msg.decode()?;
//!         Ok::<_, BoxError>(Response::new(order_id).correlation_id(order_id.to_string()))
//!     });
//! App::new(outbox)
//!     .subscriber(relay)
//!     .on_startup(rabbit.connect()) // connects, opens a confirm channel, registers "rabbit"
//!     .run()
//!     .await
//! # }
//! ```
//!
//! [`RabbitBroker::connect`] is a startup hook: it opens the connection and a
//! confirm channel within [`connect_timeout`](RabbitBroker::connect_timeout)
//! (10 s) and registers the transport. When the broker cannot be reached or
//! refuses the login, `App::run` fails before anything is consumed, naming
//! the URL (password redacted) and what to check. Then `App::run` checks
//! that every destination exists on the broker (see
//! [Startup check](#startup-check)). [`RabbitBroker::connect_transport`]
//! gives a [`RabbitTransport`] without an `App`. The crate passes the
//! transport conformance kit (`tests/tests/conformance_rabbitmq.rs`) against
//! a real RabbitMQ.
//!
//! ## Delivery contract: at least once
//!
//! Every message is published with `mandatory` and `delivery_mode = 2`
//! (persistent) on a channel in confirm mode.
//! [`Transport::publish`](outbox_core::Transport::publish) resolves `Ok` only
//! on the broker's `basic.ack` for a message that was routed to at least one
//! queue (for a durable queue: written to disk). The runtime deletes the
//! outbox row only after that. Everything else is an error and the row is
//! retried by the subscriber's retry strategy:
//!
//! - a message no queue is bound for comes back (`basic.return`,
//!   `312 NO_ROUTE`): [`Error::Unroutable`], never a silent drop;
//! - a `basic.nack`: [`Error::Nacked`];
//! - an exchange that does not exist (the broker closes the channel with
//!   `404 NOT_FOUND`): [`Error::ExchangeNotFound`], naming the exchange; the
//!   next publish opens a new channel;
//! - a lost connection or no confirm within the publish timeout:
//!   [`Error::Publish`] / [`Error::Timeout`].
//!
//! A message can arrive **more than once**: when the relay dies between the
//! broker's confirm and the row's delete, or when a confirm times out after
//! the broker took the message. Consumers deduplicate with the AMQP
//! `message_id`, which is the outbox row id and the same on every copy.
//!
//! ## What a message looks like
//!
//! | App header / part | AMQP |
//! |---|---|
//! | destination | exchange + routing key, see [Destinations](#destinations) |
//! | body | the body, byte for byte |
//! | `content-type` | property `content_type` |
//! | `correlation_id` | property `correlation_id` |
//! | `outbox-id` | property `message_id` |
//! | [`Response::key`](outbox_core::Response::key) | header [`outbox-key`](KEY_HEADER) (RabbitMQ has no message key; the routing key comes from the destination) |
//! | explicit and propagated headers | the headers table, one long-string (`S`) entry each |
//! | | `delivery_mode = 2`, `timestamp` = the publish time (seconds) |
//!
//! A property value longer than AMQP's 255-byte limit stays in the headers
//! table under the App's name instead. FastStream's `RabbitMessage` reads the
//! properties as `content_type`, `correlation_id`, `message_id` and the table
//! as `headers`.
//!
//! ## Destinations
//!
//! | destination | exchange | routing key |
//! |---|---|---|
//! | `orders` | the default exchange | `orders` (the queue `orders`, like FastStream's `RabbitQueue`) |
//! | `billing/orders.created` | `billing` | `orders.created` (like `RabbitExchange` + routing key) |
//! | `billing/` | `billing` | empty (fanout and headers exchanges) |
//! | `/odd/queue` | the default exchange | `odd/queue` (a queue whose name holds a `/`) |
//!
//! The first `/` separates the exchange from the routing key: AMQP 0-9-1
//! exchange names consist of `a-z A-Z 0-9 - _ . :` only, so an exchange
//! never holds one. Queue names and routing keys are any UTF-8 up to 255
//! bytes. [`Transport::check_destination`](outbox_core::Transport::check_destination)
//! enforces this, so a bad destination fails `App::run` at startup. The
//! transport does not declare anything by itself:
//! [`RabbitBroker::ensure_queue`], [`RabbitBroker::ensure_exchange`] and
//! [`RabbitBroker::ensure_binding`] declare durable ones (e.g. in a startup
//! hook, or before `App::run`).
//!
//! ## Startup check
//!
//! After the startup hooks connected the transport and before anything is
//! consumed, `App::run` asks it about each distinct destination
//! ([`Transport::verify_destination`](outbox_core::Transport::verify_destination)):
//! a **passive declare**, on a short-lived channel of the transport's
//! connection (or on a connection of its own when that one is gone), within
//! [`connect_timeout`](RabbitBroker::connect_timeout):
//!
//! - `orders`, `/odd/queue` (the default exchange): the queue `orders` /
//!   `odd/queue` must exist;
//! - `billing/orders.created`, `billing/`: the exchange `billing` must exist.
//!
//! A missing one fails startup, naming the subscriber, the destination, the
//! transport, the queue or exchange, and the call that declares it:
//!
//! ```text
//! subscriber `relay` publishes to `orders` on transport `rabbit`, which is not ready for it:
//! RabbitMQ has no queue `orders` (a destination without an exchange goes through the default
//! exchange to the queue of that name); declare it, e.g. `rabbit.ensure_queue("orders")` in an
//! on_startup hook or before App::run
//! ```
//!
//! A broker that cannot be reached or does not answer during the check fails
//! startup too ("could not check …" and the cause). A failed passive
//! declare makes RabbitMQ close its channel (`404 NOT_FOUND`, which lapin
//! logs at ERROR); that channel is a throwaway one, closed after each check,
//! and the confirm channel publishes use is never involved.
//!
//! **Bindings cannot be checked**: an existing exchange with no queue bound
//! for the routing key passes, and its messages fail their publish as
//! [`Error::Unroutable`] (retried, then dead-lettered). A queue or exchange
//! deleted while the App runs is a publish error as well
//! ([`Error::Unroutable`] / [`Error::ExchangeNotFound`], retried).
//!
//! ## Settings
//!
//! | setter | default | why |
//! |---|---|---|
//! | [`RabbitBroker::new`] | (required) | `amqp://user:password@host:5672/vhost` |
//! | [`name`](RabbitBroker::name) | `rabbit` | the name in `#[publish_to(rabbit, …)]` |
//! | [`connect_timeout`](RabbitBroker::connect_timeout) | 10 s | startup and each reconnect |
//! | [`publish_timeout`](RabbitBroker::publish_timeout) | 30 s | the one deadline of a publish (reconnect + send + confirm), below the default `lease_ttl` (60 s) |
//! | [`close_timeout`](RabbitBroker::close_timeout) | 10 s | closing at shutdown |
//! | [`max_message_bytes`](RabbitBroker::max_message_bytes) | 128 MiB | a larger body is refused before it is sent |
//! | [`connection_name`](RabbitBroker::connection_name) | `outbox-rabbitmq` | shown in the management UI |
//!
//! [`RabbitTransport::max_publish_time`] is the publish timeout: keep the
//! subscribers' `lease_ttl` above it plus the handler's own run time
//! (`App::run` warns otherwise). The password of the URL is redacted in
//! `Debug` and in every error.
//!
//! ## Outages
//!
//! lapin does not reconnect by itself; the transport does. All publishes
//! share one connection and one confirm channel; when the connection is lost
//! (broker restart, network failure) the publishes waiting on it fail and
//! the next publish opens a new connection and channel (within
//! `connect_timeout`, inside its publish timeout; one reconnect at a time, no
//! lock held while confirms are awaited). A publish that times out marks the
//! connection suspect, so a hung broker is replaced as well (a broker under
//! a memory or disk alarm blocks publishers: their publishes time out and
//! are retried like any outage). While the broker is down, every publish
//! fails fast or at its deadline and the rows are retried by the
//! subscriber's retry strategy; they survive an outage of about
//! `max_attempts × publish_timeout + sum of the strategy's delays`, then go
//! to the dead-letter table (`failure_reason = retry_terminal`). lapin logs
//! lost connections itself at ERROR (targets `lapin::*`); the transport's
//! own lines use the target `outbox_rabbitmq`.
//!
//! ## Permanent refusals
//!
//! A message the broker will never take ([`Error::is_retryable`] is false:
//! larger than `max_message_bytes` or the broker's `max_message_size`
//! (`406 PRECONDITION_FAILED`), `403 ACCESS_REFUSED` on the exchange, an
//! invalid name, a header name over 255 bytes) is returned wrapped in an
//! [`outbox_core::BusRejection`] naming the transport: under the default
//! retry strategy its row goes to the dead-letter table at once
//! (`failure_reason = rejected`). A missing queue or exchange is not
//! permanent: it may be declared later (missing at startup, it fails
//! `App::run` instead: [Startup check](#startup-check)).

mod broker;
mod config;
mod connection;
mod destination;
mod error;
mod transport;

pub use broker::RabbitBroker;
pub use config::{
    DEFAULT_CLOSE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONNECTION_NAME,
    DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_NAME, DEFAULT_PUBLISH_TIMEOUT,
};
pub use error::{Error, LapinError, Result};
pub use transport::{KEY_HEADER, RabbitTransport};

/// The kind of an exchange, for [`RabbitBroker::ensure_exchange`].
pub use lapin::ExchangeKind;

/// The `lapin` crate this transport is built on.
pub use lapin;

#[cfg(feature = "testing")]
pub mod testing;
