// Module map. Each file uses only files listed above it, so dependencies point
// one way (no import cycle) and the list reads from the foundations up. The
// `layering` test (tests/layering.rs: outbox_conformance::layering) checks it
// against the code (`crate::` and `super::` paths, tests included), the
// `[uses ..]` lists too.
//
//   error.rs      the crate's one error enum and its classification (is_retryable)
//   config.rs     settings and defaults, Delivery, the client's ConnectOptions,
//                 URL redaction [uses error]
//   subject.rs    subject and stream-name rules; stream creation; the stream
//                 a startup error suggests
//                 [uses config, error]
//   transport.rs  NatsTransport, the outbox_core::Transport impl: publish, the
//                 header mapping, the one deadline, BusRejection, the startup
//                 stream check (verify_destination), close
//                 [uses config, error, subject]
//   broker.rs     NatsBroker: the typed builder, its TransportBroker impl
//                 (connect_transport connects; connect() is outbox-core's shared
//                 registration step), ensure_stream()
//                 [uses config, error, subject, transport]
//   testing.rs    (feature testing) test_nats(), a capturing stand-in [uses config]
//   lib.rs        these docs and the re-exports: the public API
//
// In short (A <- B: B uses A): error <- config <- subject <- transport <- broker
// <- lib.

//! # outbox-nats
//!
//! The NATS transport of [`outbox_core`]: handler results of routes with
//! `#[publish_to(nats, "subject")]` become NATS messages, published with
//! JetStream (the default: each publish waits for the stream's
//! acknowledgement) through the official client,
//! [async-nats](https://docs.rs/async-nats).
//!
//! ```no_run
//! use outbox_core::{App, BoxError, Message, OutboxBroker, Response, Route};
//! use outbox_nats::NatsBroker;
//!
//! # async fn demo(outbox: OutboxBroker) -> Result<(), outbox_core::Error> {
//! let nats = NatsBroker::new("nats://127.0.0.1:4222");
//! let relay = Route::builder(["orders"])
//!     .publish_to("nats", "orders.created")
//!     .handler(|msg: Message, _| async move {
//!         let order_id: i64 = msg.decode()?;
//!         Ok::<_, BoxError>(Response::new(order_id))
//!     });
//! App::new(outbox)
//!     .subscriber(relay)
//!     .on_startup(nats.connect()) // connects, checks JetStream, registers "nats"
//!     .run()
//!     .await
//! # }
//! ```
//!
//! [`NatsBroker::connect`] is a startup hook: it connects within
//! [`connect_timeout`](NatsBroker::connect_timeout) (10 s), checks that
//! JetStream answers, and registers the transport. If the server does not
//! answer or refuses the credentials, `App::run` fails before anything is
//! consumed, with an error naming the URL (password redacted).
//! [`NatsBroker::connect_transport`] gives a [`NatsTransport`] without an
//! `App`. The subjects need a JetStream stream that captures them:
//! [`NatsBroker::ensure_stream`] creates one (`ensure_stream("ORDERS",
//! ["orders.>"])`), or the `nats` CLI (`nats stream add`).
//!
//! `App::run` checks that before consuming anything
//! ([`Transport::verify_destination`](outbox_core::Transport::verify_destination),
//! i.e. [`NatsTransport::verify_subject`]): for each distinct subject of its
//! routes it asks JetStream which streams capture it
//! (`$JS.API.STREAM.NAMES` with a subject filter, answered by nats-server
//! 2.9; a stream on `orders.>` captures `orders.created`), within the
//! [`publish_timeout`](NatsBroker::publish_timeout). A subject no stream
//! captures fails startup, naming the subscriber, the subject, the transport
//! and the fix (`nats.ensure_stream("ORDERS", ["orders.>"])`); a check that
//! gets no answer fails it with `could not check ...: <cause>`. With core
//! NATS ([`NatsBroker::core_publish`]) every subject is accepted: core NATS
//! has no destination to check. A stream deleted after startup is met at
//! publish ([`Error::NoStream`], transient: the row is retried).
//!
//! `NatsBroker` is a
//! [`TransportBroker`](outbox_core::transport::TransportBroker), like every
//! transport, and the crate passes the transport conformance kit
//! (`tests/tests/conformance_nats.rs`) against a real nats-server.
//!
//! ## Delivery contract: at least once, deduplicated by the server
//!
//! [`Transport::publish`](outbox_core::Transport::publish) resolves only on
//! JetStream's **PubAck**: the stream stored the message. The runtime deletes
//! the outbox row only after that; any failure is an error and the row is
//! retried.
//!
//! Each message carries **`Nats-Msg-Id` = `<source>:<outbox-id>`**: the
//! outbox's [source identity](outbox_core::Outgoing::source) and the outbox
//! row id (see [below](#why-the-id-includes-the-source) and
//! [`NatsTransport::msg_id`]).
//! JetStream drops a second message with the same id within the stream's
//! **duplicate window** (`duplicate_window`, 2 minutes by default and with
//! [`ensure_stream`](NatsBroker::ensure_stream)), and acknowledges it with
//! `duplicate: true`. So the duplicates an outbox relay otherwise produces,
//! a relay that crashed between the PubAck and the row's delete, a publish
//! that timed out after the server stored it, **disappear on NATS** as long
//! as the row is published again within the window (a crashed relay's rows
//! come back after their `lease_ttl`, 60 s by default: inside 2 minutes).
//! Such a dropped copy is logged at `debug` and counted in
//! [`NatsTransport::duplicates`] and the metric `outbox_nats_duplicates_total`
//! (labels `transport`, `subject`). Past the window a redelivery is stored
//! again: consumers that must never see a duplicate still deduplicate on
//! `outbox-id`.
//!
//! ### Why the id includes the source
//!
//! Row ids are unique within **one** outbox table only, and the window is per
//! stream. With the bare row id, two outbox tables (two services, two
//! databases, two schemas) publishing into one stream collide: row 42 of
//! the second table, published within the window after row 42 of the first,
//! is acknowledged as a duplicate and **not stored, while its row is
//! deleted**: lost. So `App::run` resolves, once at startup, the identity of
//! its outbox table
//! ([`OutboxBroker::resolve_source`](outbox_core::OutboxBroker::resolve_source):
//! `<system_identifier>/<database oid>/<schema>.<table>` read from
//! PostgreSQL) and this transport sends
//! `Nats-Msg-Id: 7716180956082555048/16384/billing.outbox:42`. It is stable
//! across restarts (a redelivered row keeps its id and is still dropped)
//! and differs between tables. Precedence:
//!
//! 1. an explicit [`msg_id_prefix`](NatsBroker::msg_id_prefix): `prefix` +
//!    `outbox-id`, the source unused (you keep the prefix unique per outbox
//!    table; `msg_id_prefix("")` restores the bare id);
//! 2. the message's source (every message an `App` relays):
//!    `<source>:<outbox-id>`; readable with
//!    [`OutboxBroker::source_id`](outbox_core::OutboxBroker::source_id)
//!    (`orders-service:42`);
//! 3. neither (an [`Outgoing`](outbox_core::Outgoing) built by hand): the
//!    bare `outbox-id`.
//!
//! A faststream-outbox (Python) relay of the same table publishes through
//! FastStream, which sets no `Nats-Msg-Id` unless its handler does: its
//! messages are never dropped and never collide with these ids, and a row
//! handled by both relays (a lease taken over) is stored twice.
//!
//! The `outbox-id` and `message_id` headers stay the bare row id. Upgrading
//! from the bare ids changes them once: a row published before the upgrade
//! and redelivered after it within the window is stored twice (a duplicate,
//! never a loss).
//!
//! ### Core NATS: an explicit opt-in, at most once
//!
//! [`NatsBroker::core_publish`] ([`Delivery::Core`]) publishes with core NATS:
//! no stream, no acknowledgement. A publish resolves once the message was
//! flushed to the server's socket. The server delivers it to the subscribers
//! online at that moment and forgets it: with no subscriber, a slow consumer
//! or a server crash **the message is lost, and its row is already deleted**.
//! Use it only for subjects where losing messages is acceptable. Startup
//! checks no stream in this mode.
//!
//! ## What a message looks like
//!
//! | message part | value |
//! |---|---|
//! | subject | the route's destination (`#[publish_to(nats, "orders.created")]`) |
//! | payload | the handler's result, encoded like a published body, byte for byte |
//! | header `content-type` | `application/json`, `text/plain`, … (absent for raw bytes) |
//! | header `correlation_id` | the response's correlation id, else the inbound row's |
//! | header `outbox-id` | the outbox row id |
//! | header `message_id` | the `outbox-id` too (unless the handler set one): FastStream's `msg.message_id` |
//! | header `Nats-Msg-Id` | JetStream only, the deduplication id: `<source>:<outbox-id>`, or [`msg_id_prefix`](NatsBroker::msg_id_prefix) + `outbox-id` |
//! | header `outbox-key` | [`Response::key`](outbox_core::Response::key), if any (NATS has no message key) |
//! | other headers | explicit (`Response::header`) and propagated row headers, 1:1 |
//!
//! These are the header names FastStream's NATS parser reads
//! (`content-type`, `correlation_id`, `message_id`), so a FastStream
//! `NatsBroker` subscriber (core or JetStream) decodes the message natively.
//! NATS headers are text: a key that is not UTF-8, a header value with a line
//! break or a header name with `:` or whitespace is a permanent refusal.
//!
//! ## Settings that matter
//!
//! | setting | default | |
//! |---|---|---|
//! | [`publish_timeout`](NatsBroker::publish_timeout) | 30 s | the one deadline of a publish, reconnect waits included ([`max_publish_time`](outbox_core::Transport::max_publish_time)); keep `lease_ttl` above it; also bounds the startup stream check |
//! | [`connect_timeout`](NatsBroker::connect_timeout) | 10 s | startup connect and JetStream check |
//! | [`flush_timeout`](NatsBroker::flush_timeout) | 10 s | closing |
//! | [`delivery`](NatsBroker::delivery) | JetStream | [`core_publish`](NatsBroker::core_publish) opts in to at most once |
//! | [`msg_id_prefix`](NatsBroker::msg_id_prefix) | none: `<source>:` | replaces the source in `Nats-Msg-Id`; keep it unique per outbox table |
//! | credentials | none | in the URL, [`token`](NatsBroker::token), [`user_password`](NatsBroker::user_password), [`credentials_file`](NatsBroker::credentials_file) |
//!
//! The stream's own settings matter too: `duplicate_window` (dedup horizon),
//! `max_msg_size`, `max_msgs`/`max_bytes` with `discard: new` (a full stream
//! refuses publishes: retried), replicas.
//!
//! ## Outages
//!
//! async-nats reconnects by itself (forever, with backoff). While the server
//! is away a publish waits, at most [`publish_timeout`](NatsBroker::publish_timeout),
//! then fails with [`Error::Timeout`]: the row stays in the outbox and is
//! retried; nothing hangs. A message queued in the client when its publish
//! gave up may still be sent after the reconnect; its `Nats-Msg-Id` makes the
//! retried copy a duplicate the stream drops.
//!
//! ## Errors
//!
//! | case | when | what happens |
//! |---|---|---|
//! | server unreachable, credentials refused | startup | `App::run` fails: [`Error::Unreachable`], [`Error::Refused`] |
//! | JetStream disabled | startup | [`Error::NoJetStream`] |
//! | invalid subject (empty token, `*`/`>`, whitespace) | startup | `check_destination` fails `App::run` naming handler and subject |
//! | no stream captures the subject (JetStream) | startup | `verify_destination` fails `App::run`, naming the subscriber, the subject and the `ensure_stream` fix |
//! | the startup check unanswered within the publish timeout | startup | `App::run` fails: `could not check ...: <cause>` |
//! | no stream captures the subject any more (deleted after startup: "no responders") | publish | [`Error::NoStream`], **transient**: the row is retried until a stream captures it again; the row is never lost |
//! | message over the server's `max_payload` (1 MiB default) | publish | [`Error::TooLarge`], a `BusRejection`: dead-lettered as `rejected` |
//! | message over the stream's `max_msg_size` | publish | [`Error::StreamRefused`] (err_code 10054), a `BusRejection` |
//! | other JetStream refusals (stream full, …) | publish | [`Error::StreamRefused`], transient |
//! | server away, ack late | publish | [`Error::Timeout`], transient |
//!
//! A publish to a subject the user is not permitted to publish to is
//! answered by the server with an asynchronous permissions error and no
//! PubAck: it fails as a timeout (transient) and the server's error is
//! logged by the client.

mod broker;
mod config;
mod error;
mod subject;
mod transport;

pub use broker::NatsBroker;
pub use config::{
    DEFAULT_CLIENT_NAME, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DUPLICATE_WINDOW, DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_NAME, DEFAULT_PUBLISH_TIMEOUT, Delivery,
};
pub use error::{Error, JS_ERR_MESSAGE_SIZE, Result, Source};
pub use transport::{DUPLICATES_METRIC, KEY_HEADER, MESSAGE_ID_HEADER, NATS_MSG_ID, NatsTransport};

/// The `async-nats` crate this transport is built on (for JetStream stream
/// configuration, consumers, headers).
pub use async_nats;

#[cfg(feature = "testing")]
pub mod testing;
